"""The echo server that gives bench server its protocol floor: started for real on loopback,
it reads whole requests over both protocols and answers a fixed reply."""

from __future__ import annotations

import os

import numpy as np

from recserve.loadgen.synthetic import QueryFactory
from recserve.models import build_model
from recserve.server.client import HTTPClient, grpc_infer_bytes, http_infer_body
from recserve.server.echo import REPLY_BYTES, EchoServer, grpc_echo_call
from recserve.server.grpc_wire import split_infer_request


def test_echo_server_reads_requests_and_answers_over_both_protocols() -> None:
    model = build_model("wnd", "tiny", seed=0)
    batch = QueryFactory(model.config, seed=1).make(16)
    header, blobs = http_infer_body(batch, model.config)
    data = grpc_infer_bytes("wnd", batch, model.config)
    request, raw, _ = split_infer_request(data)  # the request the server would get
    assert request.model_name == "wnd" and len(raw) == len(request.inputs) == len(blobs)
    assert all(bytes(r) == bytes(b) for r, b in zip(raw, blobs, strict=True))
    with EchoServer() as echo:
        assert echo.pid > 0 and echo.pid != os.getpid()
        http = HTTPClient(echo.http_url)
        call, channel = grpc_echo_call(echo.grpc_url)
        try:
            for _ in range(3):  # one connection each, kept alive
                body = http.post("/echo", header, blobs)
                assert body.endswith(bytes(REPLY_BYTES))
                assert call(data) == bytes(REPLY_BYTES)
            big = np.zeros(3 << 20, dtype=np.uint8)  # larger than any default limit
            assert http.post("/echo", header, [big]).endswith(bytes(REPLY_BYTES))
            assert call(bytes(big)) == bytes(REPLY_BYTES)
        finally:
            http.close()
            channel.close()
