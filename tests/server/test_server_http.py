"""The real server over HTTP/REST: tritonclient.http, every bad input, repository, metrics."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from server_helpers import MAX_BODY, MAX_ITEMS, REPO_MODELS, query, reference, triton_inputs
from tritonclient.utils import InferenceServerException

from recserve.models import RecModel, load_model
from recserve.server import InvalidArgument, ServerSettings, ServerThread
from recserve.server.client import HTTPClient, batch_tensors, send_buffers


@pytest.fixture(scope="module")
def client(server: ServerThread) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.http_url, network_timeout=30)


def request(
    server: ServerThread,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    host, port = server.http_url.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(data) if data else None
    except ValueError:
        return response.status, data


def test_health_and_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "recserve" and "binary_tensor_data" in meta["extensions"]
    for name in REPO_MODELS:
        assert client.is_model_ready(name)
        assert client.is_model_ready(name, "1")
    assert not client.is_model_ready("wnd", "2")
    assert not client.is_model_ready("missing")
    meta = client.get_model_metadata("wnd")
    assert meta["versions"] == ["1"]
    assert meta["inputs"][0] == {"name": "dense", "datatype": "FP32", "shape": [-1, 16]}
    assert meta["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [-1, 1]}]
    config = client.get_model_config("mt-wnd")
    assert config["output"] == [{"name": "scores", "data_type": "TYPE_FP32", "dims": [-1, 3]}]
    assert config["parameters"]["max_items"]["string_value"] == str(MAX_ITEMS)


@pytest.mark.parametrize("name", REPO_MODELS)
@pytest.mark.parametrize("binary", [True, False])
def test_infer_equals_in_process(
    client: httpclient.InferenceServerClient, models: dict[str, RecModel], name: str, binary: bool
) -> None:
    model = models[name]
    batch = query(model.config, 7, seed=3)
    outputs = [httpclient.InferRequestedOutput("scores", binary_data=binary)]
    result = client.infer(
        name,
        triton_inputs(httpclient, batch, model.config, binary),
        outputs=outputs,
        request_id="r7",
    )
    np.testing.assert_allclose(result.as_numpy("scores"), reference(model, batch), rtol=1e-6)
    assert result.get_response()["id"] == "r7"


def test_infer_lengths_version_and_compression(
    client: httpclient.InferenceServerClient, models: dict[str, RecModel]
) -> None:
    model = models["dlrm-rmc2"]
    batch = query(model.config, 5)
    inputs = []
    for tensor in triton_inputs(httpclient, batch, model.config):
        name = tensor.name()
        if name.endswith(".offsets"):
            key = name.removesuffix(".offsets")
            lengths = np.diff(batch.sparse.feature(key)[1].numpy())
            tensor = httpclient.InferInput(f"{key}.lengths", list(lengths.shape), "INT64")
            tensor.set_data_from_numpy(lengths)
        inputs.append(tensor)
    expected = reference(model, batch)
    for algorithm in (None, "gzip", "deflate"):
        result = client.infer(
            "dlrm-rmc2", inputs, model_version="1", request_compression_algorithm=algorithm
        )
        np.testing.assert_allclose(result.as_numpy("scores"), expected, rtol=1e-6)


def test_own_http_client(server: ServerThread, models: dict[str, RecModel]) -> None:
    model = models["din"]
    batch = query(model.config, 6)
    c = HTTPClient(server.http_url)
    try:
        for _ in range(3):  # keep-alive connection reused
            np.testing.assert_allclose(
                c.infer("din", model.config, batch), reference(model, batch), rtol=1e-6
            )
    finally:
        c.close()


def test_send_buffers_sends_every_byte_in_order_through_partial_sends() -> None:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # the kernel takes a little at a time
    rng = np.random.default_rng(0)
    buffers: list[Any] = [rng.bytes(n) for n in (0, 1, 70_000, 3, 0, 250_000, 17)]
    buffers[2] = memoryview(np.frombuffer(buffers[2], np.int64))  # not a byte view: cast
    expected = b"".join(bytes(memoryview(x).cast("B")) for x in buffers)
    got = bytearray()

    def read() -> None:
        while len(got) < len(expected):
            got.extend(b.recv(65536))

    reader = threading.Thread(target=read)
    reader.start()
    send_buffers(a, buffers)
    reader.join(30)
    a.close()
    b.close()
    assert bytes(got) == expected


def body_of(model: RecModel, batch: Any, edit: Any = None) -> tuple[bytes, dict[str, str]]:
    """A binary-extension body; ``edit(inputs, blobs)`` may change it before encoding."""
    inputs, blobs = [], []
    for name, datatype, shape, data in batch_tensors(batch, model.config):
        inputs.append(
            {
                "name": name,
                "datatype": datatype,
                "shape": shape,
                "parameters": {"binary_data_size": data.nbytes},
            }
        )
        blobs.append(bytes(data))
    if edit is not None:
        edit(inputs, blobs)
    header = json.dumps({"inputs": inputs}).encode()
    return header + b"".join(blobs), {"Inference-Header-Content-Length": str(len(header))}


def replace(name: str, data: np.ndarray, datatype: str = "INT64") -> Any:
    def edit(inputs: list[dict[str, Any]], blobs: list[bytes]) -> None:
        i = next(i for i, x in enumerate(inputs) if x["name"] == name)
        raw = data.astype("<i8" if datatype == "INT64" else "<f4").tobytes()
        inputs[i].update(
            datatype=datatype, shape=list(data.shape), parameters={"binary_data_size": len(raw)}
        )
        blobs[i] = raw

    return edit


def drop(name: str) -> Any:
    def edit(inputs: list[dict[str, Any]], blobs: list[bytes]) -> None:
        i = next(i for i, x in enumerate(inputs) if x["name"] == name)
        del inputs[i], blobs[i]

    return edit


def extra(inputs: list[dict[str, Any]], blobs: list[bytes]) -> None:
    inputs.append({"name": "t7.values", "datatype": "INT64", "shape": [1], "data": [0]})


def nan_dense(inputs: list[dict[str, Any]], blobs: list[bytes]) -> None:
    dense = np.frombuffer(blobs[0], dtype="<f4").copy()
    dense[5] = np.nan
    blobs[0] = dense.tobytes()


def wrong_dtype(inputs: list[dict[str, Any]], blobs: list[bytes]) -> None:
    inputs[1]["datatype"] = "INT32"


def wrong_shape(inputs: list[dict[str, Any]], blobs: list[bytes]) -> None:
    inputs[0]["shape"] = [inputs[0]["shape"][0], 15]


BAD_INPUTS = [
    ("missing tensor", drop("t1.values"), ["missing input tensor 't1.values'"]),
    ("extra tensor", extra, ["unexpected input tensor 't7.values'"]),
    ("wrong datatype", wrong_dtype, ["'t0.values'", "INT64", "INT32"]),
    ("wrong shape", wrong_shape, ["'dense'", "[B, 16]"]),
    ("id out of range", replace("t2.values", np.full(4, 10_000)), ["'t2'", "out of range"]),
    ("negative id", replace("t0.values", np.array([1, -3, 2, 0])), ["'t0'", "negative"]),
    ("offsets past values", replace("t1.offsets", np.array([0, 1, 2, 3, 9])), ["'t1.offsets'"]),
    ("offsets too few", replace("t1.offsets", np.array([0, 4])), ["'t1.offsets'", "B + 1"]),
    ("NaN dense", nan_dense, ["dense", "NaN"]),
]


@pytest.mark.parametrize(("case", "edit", "words"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_answer_400_naming_the_tensor(
    server: ServerThread, models: dict[str, RecModel], case: str, edit: Any, words: list[str]
) -> None:
    model = models["wnd"]
    body, headers = body_of(model, query(model.config, 4, jitter=False), edit)
    status, answer = request(server, "POST", "/v2/models/wnd/infer", body, headers)
    assert status == 400, answer
    for word in words:
        assert word in answer["error"]


def test_malformed_requests(server: ServerThread, models: dict[str, RecModel]) -> None:
    model = models["wnd"]
    body, headers = body_of(model, query(model.config, 4))
    hlen = int(headers["Inference-Header-Content-Length"])
    cases = [
        ("/v2/models/wnd/infer", b"{oops", {}, 400, "not valid JSON"),
        ("/v2/models/wnd/infer", body[:-3], headers, 400, "truncated"),
        ("/v2/models/wnd/infer", body, {"Inference-Header-Content-Length": "x"}, 400, "integer"),
        (
            "/v2/models/wnd/infer",
            body,
            {"Inference-Header-Content-Length": str(10**9)},
            400,
            "outside",
        ),
        ("/v2/models/wnd/infer", body[:hlen], {}, 400, "truncated"),
        (
            "/v2/models/wnd/infer",
            body,
            {**headers, "Content-Encoding": "br"},
            400,
            "Content-Encoding",
        ),
        ("/v2/models/wnd/infer", b"\0", {"Content-Encoding": "deflate"}, 400, "request body"),
        (
            "/v2/models/wnd/infer",
            b"\x1f\x8b junk",
            {"Content-Encoding": "gzip"},
            400,
            "request body",
        ),
        ("/v2/models/nope/infer", body, headers, 404, "unknown model 'nope'"),
        ("/v2/models/wnd/versions/3/infer", body, headers, 404, "no version '3'"),
        ("/v2/models/wnd/infer", b"x" * (MAX_BODY + 1), {}, 413, ""),
    ]
    for path, data, hdrs, status, word in cases:
        got, answer = request(server, "POST", path, data, hdrs)
        assert got == status, (path, word, answer)
        assert word in answer["error"]


def test_batch_over_the_limit(server: ServerThread, models: dict[str, RecModel]) -> None:
    model = models["ncf"]  # no dense features: B comes from the first feature's offsets
    body, headers = body_of(model, query(model.config, MAX_ITEMS + 1))
    status, answer = request(server, "POST", "/v2/models/ncf/infer", body, headers)
    assert status == 400
    assert "'mf_user.offsets'" in answer["error"] and f"limit of {MAX_ITEMS}" in answer["error"]


def test_tritonclient_sees_error_message(
    client: httpclient.InferenceServerClient, models: dict[str, RecModel]
) -> None:
    model = models["wnd"]
    inputs = triton_inputs(httpclient, query(model.config, 3), model.config)
    with pytest.raises(InferenceServerException, match="missing input tensor 'dense'"):
        client.infer("wnd", inputs[1:])
    assert client.is_server_live()


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v2/models/..%2F..%2Fetc/ready", 400),
        ("GET", "/v2/models/.hidden", 400),
        ("POST", "/v2/repository/models/..%2Fx/load", 400),
        ("POST", "/v2/repository/models/../load", 400),
        ("GET", "/v2/nothing-here", 404),
        ("DELETE", "/v2/models/wnd", 405),
        ("POST", "/v2/repository/models/not-there/load", 404),
    ],
)
def test_names_and_routes(server: ServerThread, method: str, path: str, status: int) -> None:
    got, answer = request(server, method, path)
    assert got == status, answer
    assert answer and "error" in answer


def test_unload_and_load(
    server: ServerThread, client: httpclient.InferenceServerClient, models: dict[str, RecModel]
) -> None:
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["wnd"]["state"] == "READY"
    client.unload_model("ncf")
    try:
        assert not client.is_model_ready("ncf")
        index = {m["name"]: m for m in client.get_model_repository_index()}
        assert index["ncf"]["state"] == "UNAVAILABLE"
        status, answer = request(server, "GET", "/v2/models/ncf")
        assert status == 404 and "/v2/repository/models/ncf/load" in answer["error"]
    finally:
        client.load_model("ncf")
    assert client.is_model_ready("ncf")
    model = models["ncf"]
    batch = query(model.config, 4)
    result = client.infer("ncf", triton_inputs(httpclient, batch, model.config))
    np.testing.assert_allclose(result.as_numpy("scores"), reference(model, batch), rtol=1e-6)


def test_metrics(
    server: ServerThread, client: httpclient.InferenceServerClient, models: dict[str, RecModel]
) -> None:
    model = models["wnd"]
    client.infer("wnd", triton_inputs(httpclient, query(model.config, 5), model.config))
    request(server, "POST", "/v2/models/wnd/infer", b"{")
    status, text = request(server, "GET", "/metrics")
    assert status == 200
    text = text.decode()
    for needle in [
        'recserve_requests_total{model="wnd",protocol="http"}',
        'recserve_request_failures_total{model="wnd",protocol="http",reason="invalid_argument"}',
        'recserve_queue_duration_seconds_bucket{le="0.001",model="wnd"}',
        'recserve_compute_duration_seconds_count{model="wnd"}',
        'recserve_request_duration_seconds_sum{model="wnd",protocol="http"}',
        'recserve_batch_items_bucket{le="8.0",model="wnd"}',
        'recserve_batch_requests_count{model="wnd"}',
        'recserve_queue_depth{model="wnd"} 0.0',
        'recserve_model_ready{model="wnd"} 1.0',
        'recserve_engine_queue_depth{model="wnd"}',
    ]:
        assert needle in text, needle


def test_serving_json_overrides_and_model_control(tmp_path: Path, repo: Path) -> None:
    """A model folder's serving.json overrides the server's defaults; a bad one fails the load
    (and the server keeps serving); with model control off, load and unload are refused."""
    shutil.copytree(repo / "ncf", tmp_path / "ncf")
    (tmp_path / "ncf" / "serving.json").write_text(json.dumps({"max_items": 2}))
    shutil.copytree(repo / "wnd", tmp_path / "broken")
    (tmp_path / "broken" / "serving.json").write_text(json.dumps({"max_itemz": 2}))
    settings = ServerSettings(repository=tmp_path, models=("ncf",), http_port=0, grpc_port=None)
    with ServerThread(settings) as server:
        model = load_model(tmp_path / "ncf")
        body, headers = body_of(model, query(model.config, 3))
        status, answer = request(server, "POST", "/v2/models/ncf/infer", body, headers)
        assert status == 400 and "limit of 2" in answer["error"]
        status, answer = request(server, "POST", "/v2/repository/models/broken/load")
        assert status == 400 and "max_itemz" in answer["error"]
        body, headers = body_of(model, query(model.config, 2))
        assert request(server, "POST", "/v2/models/ncf/infer", body, headers)[0] == 200
    settings = ServerSettings(repository=tmp_path, models=("ncf",), http_port=0, grpc_port=None,
                              model_control=False)  # fmt: skip
    with ServerThread(settings) as server:
        for action in ("load", "unload"):
            status, answer = request(server, "POST", f"/v2/repository/models/ncf/{action}")
            assert status == 400 and "model control is disabled" in answer["error"]
        assert request(server, "GET", "/v2/models/ncf/ready")[0] == 200


def test_start_fails_on_a_broken_model(tmp_path: Path, repo: Path) -> None:
    shutil.copytree(repo / "wnd", tmp_path / "wnd")
    (tmp_path / "wnd" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InvalidArgument, match="failed to load model 'wnd'"):
        ServerThread(ServerSettings(repository=tmp_path, http_port=0, grpc_port=None)).start()
