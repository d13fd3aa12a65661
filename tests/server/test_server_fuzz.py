"""Hypothesis fuzzing of the HTTP API: whatever arrives, the answer is never a 5xx."""

from __future__ import annotations

import copy
import http.client
import json
from typing import Any
from urllib.parse import quote

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_helpers import query

from recserve.models import RecModel
from recserve.server import ServerThread
from recserve.server.client import batch_tensors

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
segments = st.one_of(
    st.sampled_from(["wnd", "ncf", "..", ".", "", "1", "%2F..%2F", "v2", "x" * 200]),
    st.text(max_size=12).map(lambda s: quote(s, safe="")),
)
FIELDS = ["name", "datatype", "shape", "data", "parameters"]


def send(
    server: ServerThread, method: str, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, bytes]:
    host, port = server.http_url.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def valid_request(
    model: RecModel, batch_size: int, binary: bool
) -> tuple[dict[str, Any], list[bytes]]:
    inputs, blobs = [], []
    for name, datatype, shape, data in batch_tensors(query(model.config, batch_size), model.config):
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            entry["parameters"] = {"binary_data_size": data.nbytes}
            blobs.append(bytes(data))
        else:
            dtype = np.float32 if datatype == "FP32" else np.int64
            entry["data"] = np.frombuffer(data, dtype=dtype).tolist()
        inputs.append(entry)
    return {"inputs": inputs}, blobs


@st.composite
def mutated_infer(
    draw: st.DrawFn, models: dict[str, RecModel]
) -> tuple[str, bytes, dict[str, str]]:
    name = draw(st.sampled_from(["wnd", "ncf"]))
    binary = draw(st.booleans())
    request, blobs = valid_request(models[name], draw(st.integers(1, 3)), binary)
    request = copy.deepcopy(request)
    for _ in range(draw(st.integers(0, 3))):
        inputs = request["inputs"] if isinstance(request.get("inputs"), list) else []
        op = draw(st.sampled_from(["field", "top", "drop", "dup", "blob", "outputs"]))
        i = draw(st.integers(0, len(inputs) - 1)) if inputs else 0
        if op == "field" and inputs and isinstance(inputs[i], dict):
            inputs[i][draw(st.sampled_from(FIELDS))] = draw(json_values)
        elif op == "top":
            request[draw(st.sampled_from(["inputs", "outputs", "id", "parameters", "x"]))] = draw(
                json_values
            )
        elif op == "drop" and inputs:
            del inputs[i]
        elif op == "dup" and inputs:
            inputs.append(copy.deepcopy(inputs[i]))
        elif op == "blob" and blobs:
            j = draw(st.integers(0, len(blobs) - 1))
            blobs[j] = (
                draw(st.binary(max_size=64))
                if draw(st.booleans())
                else blobs[j][: draw(st.integers(0, len(blobs[j])))]
            )
        elif op == "outputs":
            request["outputs"] = [
                {
                    "name": draw(st.sampled_from(["scores", "x"])),
                    "parameters": {"binary_data": draw(json_values)},
                }
            ]
    header = json.dumps(request).encode()
    headers = {}
    if binary:
        headers["Inference-Header-Content-Length"] = str(
            draw(st.sampled_from([len(header), len(header)]) | st.integers(-5, len(header) + 100))
        )
    return f"/v2/models/{name}/infer", header + b"".join(blobs), headers


@FUZZ
@given(data=st.data())
def test_http_api_never_answers_5xx(
    server: ServerThread, models: dict[str, RecModel], data: st.DataObject
) -> None:
    kind = data.draw(st.sampled_from(["route", "infer", "raw"]))
    headers: dict[str, str] = {}
    if kind == "route":
        method = data.draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD"]))
        template = data.draw(
            st.sampled_from(
                [
                    "/v2/models/{}",
                    "/v2/models/{}/ready",
                    "/v2/models/{}/config",
                    "/v2/models/{}/infer",
                    "/v2/models/wnd/versions/{}",
                    "/v2/models/{}/versions/{}/infer",
                    "/v2/repository/models/{}/load",
                    "/v2/repository/models/{}/unload",
                    "/v2/{}",
                    "/{}",
                ]
            )
        )
        path = template.format(*(data.draw(segments) for _ in range(template.count("{}"))))
        if "/unload" in path or "/load" in path:
            path = path.replace("/wnd/", "/zz/").replace("/ncf/", "/zz/")  # keep the models loaded
        body = json.dumps(data.draw(json_values)).encode()
    elif kind == "infer":
        method = "POST"
        path, body, headers = data.draw(mutated_infer(models))
    else:
        method, path = "POST", "/v2/models/wnd/infer"
        body = data.draw(st.binary(max_size=256))
        if data.draw(st.booleans()):
            headers["Inference-Header-Content-Length"] = data.draw(
                st.sampled_from(["0", "-1", "9999", "x", "3"])
            )
        if data.draw(st.booleans()):
            headers["Content-Encoding"] = data.draw(
                st.sampled_from(["gzip", "deflate", "identity", "br"])
            )
    status, answer = send(server, method, path, body, headers)
    assert status < 500, (method, path, status, answer[:300])
    if status >= 400 and method != "HEAD":
        assert "error" in json.loads(answer)


def test_still_serving_after_fuzz(server: ServerThread, models: dict[str, RecModel]) -> None:
    request, _ = valid_request(models["wnd"], 2, binary=False)
    status, answer = send(server, "POST", "/v2/models/wnd/infer", json.dumps(request).encode(), {})
    assert status == 200, answer
