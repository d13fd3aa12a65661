"""Overload (refused at once, nothing lost), graceful shutdown, and a bounded load test."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
from server_helpers import query, reference, wait_until
from torch import nn

from recserve.models import RecModel, build_model
from recserve.server import ServerSettings, ServerThread, ServingConfig
from recserve.server.client import GRPCClient, HTTPClient, InferError, batch_tensors
from recserve.types import Batch


class SlowModel(nn.Module):
    """A tiny model that takes ``delay_s`` per call (an engine that is always busy)."""

    def __init__(self, inner: RecModel, delay_s: float) -> None:
        super().__init__()
        self.inner, self.config, self.delay_s = inner, inner.config, delay_s

    def forward(self, batch: Batch) -> torch.Tensor:
        time.sleep(self.delay_s)
        return self.inner(batch)


def slow_server(delay_s: float, frontends: int = 0, **serving: Any) -> ServerThread:
    settings = ServerSettings(
        http_port=0,
        grpc_port=0,
        grace_s=10.0,
        frontends=frontends,
        serving=ServingConfig(**serving),
    )
    model = SlowModel(build_model("wnd", "tiny"), delay_s)
    return ServerThread(settings, models={"slow": model})


def metric(server: ServerThread, name: str) -> float:
    text = server.server.core.metrics.render().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.mark.parametrize("frontends", [0, 2])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_overload_refuses_at_once_and_loses_nothing(protocol: str, frontends: int) -> None:
    # No joining (2-item requests, 2-item batches), one slot, four requests admitted at a time.
    with slow_server(
        0.02, frontends, max_queue_requests=4, max_inflight_batches=1, max_batch_items=2
    ) as server:
        inner = server.server.core.repository.models["slow"].engine.model.inner  # type: ignore[attr-defined]
        batches = [query(inner.config, 2, seed=i) for i in range(40)]
        expected = [reference(inner, b) for b in batches]
        outcomes = Counter(concurrent_calls(server, protocol, "slow", inner, batches, expected))
        refused = "429" if protocol == "http" else "RESOURCE_EXHAUSTED"
        assert set(outcomes) == {"ok", refused}, outcomes
        assert outcomes["ok"] >= 4
        failures = f'recserve_request_failures_total{{model="slow",protocol="{protocol}",reason="overloaded"}}'
        # (front ends report each outcome in a message of its own: it may trail the answer)
        wait_until(lambda: metric(server, failures) == outcomes[refused])
        assert metric(server, 'recserve_items_total{model="slow"}') == 2 * outcomes["ok"]
        assert metric(server, 'recserve_queue_depth{model="slow"}') == 0


def concurrent_calls(
    server: ServerThread,
    protocol: str,
    name: str,
    model: Any,
    batches: list[Batch],
    expected: list[np.ndarray],
    rtol: float = 1e-6,
    atol: float = 0.0,
) -> list[str]:
    """Every batch from 16 threads at once (a client per thread): ``ok`` where the scores are
    the expected ones, else the refusal's status."""
    local = threading.local()

    def call(i: int) -> str:
        if not hasattr(local, "client"):
            url = server.http_url if protocol == "http" else server.grpc_url
            local.client = HTTPClient(url) if protocol == "http" else GRPCClient(url)
        try:
            scores = local.client.infer(name, model.config, batches[i])
        except InferError as e:
            return str(e.status)
        np.testing.assert_allclose(scores, expected[i], rtol=rtol, atol=atol)
        return "ok"

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(call, range(len(batches))))


def test_http_overload_says_when_to_retry() -> None:
    with slow_server(0.3, max_queue_requests=1, max_inflight_batches=1) as server:
        inner = server.server.core.repository.models["slow"].engine.model.inner  # type: ignore[attr-defined]
        batch = query(inner.config, 2)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(HTTPClient(server.http_url).infer, "slow", inner.config, batch)
            batcher = server.server.core.repository.models["slow"].batcher
            wait_until(lambda: batcher.inflight_requests == 1)
            host, port = server.http_url.rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            body, headers = encode_body(inner.config, batch)
            conn.request("POST", "/v2/models/slow/infer", body=body, headers=headers)
            response = conn.getresponse()
            assert response.status == 429 and response.getheader("Retry-After") == "1"
            assert "queue is full" in json.loads(response.read())["error"]
            conn.close()
            np.testing.assert_allclose(first.result(30), reference(inner, batch), rtol=1e-6)


def encode_body(config: Any, batch: Batch) -> tuple[bytes, dict[str, str]]:
    inputs, blobs = [], []
    for name, datatype, shape, data in batch_tensors(batch, config):
        inputs.append({"name": name, "datatype": datatype, "shape": shape,
                       "parameters": {"binary_data_size": data.nbytes}})  # fmt: skip
        blobs.append(bytes(data))
    header = json.dumps({"inputs": inputs}).encode()
    return header + b"".join(blobs), {"Inference-Header-Content-Length": str(len(header))}


def test_requests_waiting_for_the_engine_are_joined() -> None:
    """While the only slot is busy, queued requests go to the engine as one call, and each
    gets its own rows back."""
    with slow_server(0.5, max_inflight_batches=1, max_batch_items=64) as server:
        inner = server.server.core.repository.models["slow"].engine.model.inner  # type: ignore[attr-defined]
        batches = [query(inner.config, 1 + i, seed=i) for i in range(6)]

        def call(i: int) -> np.ndarray:
            client = GRPCClient(server.grpc_url) if i % 2 else HTTPClient(server.http_url)
            try:
                return client.infer("slow", inner.config, batches[i])
            finally:
                client.close()

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(call, range(6)))
        for batch, scores in zip(batches, results, strict=True):
            np.testing.assert_allclose(scores, reference(inner, batch), rtol=1e-5, atol=1e-6)
        calls = metric(server, 'recserve_batch_requests_count{model="slow"}')
        assert metric(server, 'recserve_batch_requests_sum{model="slow"}') == 6
        assert calls < 6  # at least two requests shared an engine call
        assert metric(server, 'recserve_batch_items_sum{model="slow"}') == sum(range(1, 7))


@pytest.mark.parametrize("frontends", [0, 2])
def test_graceful_shutdown_finishes_in_flight_requests(frontends: int) -> None:
    server = slow_server(0.3, frontends, max_inflight_batches=1, max_batch_items=2).start()
    inner = server.server.core.repository.models["slow"].engine.model.inner  # type: ignore[attr-defined]
    batches = [query(inner.config, 2, seed=i) for i in range(3)]
    url = server.http_url

    def call(batch: Batch) -> np.ndarray:
        client = HTTPClient(url)
        try:
            return client.infer("slow", inner.config, batch)
        finally:
            client.close()

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(call, b) for b in batches]
        batcher = server.server.core.repository.models["slow"].batcher
        wait_until(lambda: batcher.inflight_requests + batcher.queued_requests == 3)
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        for future, batch in zip(futures, batches, strict=True):
            np.testing.assert_allclose(future.result(30), reference(inner, batch), rtol=1e-6)
        stopper.join(30)
    assert not stopper.is_alive()
    with pytest.raises(OSError):
        call(batches[0])


def test_bounded_load_all_answers_correct(
    server: ServerThread, models: dict[str, RecModel]
) -> None:
    """Eight concurrent clients (HTTP and gRPC) for a fixed time: every answer right, no error."""
    names = ("wnd", "dlrm-rmc2", "din")
    pool = {n: [query(models[n].config, b, seed=b) for b in (1, 5, 16)] for n in names}
    expected = {n: [reference(models[n], b) for b in pool[n]] for n in names}
    deadline = time.monotonic() + 3.0
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def client_loop(k: int) -> None:
        client = HTTPClient(server.http_url) if k % 2 else GRPCClient(server.grpc_url)
        done = 0
        try:
            while time.monotonic() < deadline and done < 2000:
                name = names[(k + done) % len(names)]
                i = done % 3
                scores = client.infer(name, models[name].config, pool[name][i])
                np.testing.assert_allclose(scores, expected[name][i], rtol=1e-5, atol=1e-6)
                done += 1
        finally:
            client.close()
        with lock:
            counts["http" if k % 2 else "grpc"] += done

    with ThreadPoolExecutor(8) as executor:
        for f in [executor.submit(client_loop, k) for k in range(8)]:
            f.result(60)
    assert counts["http"] > 20 and counts["grpc"] > 20, counts


def test_rec_engine_behind_the_server(models: dict[str, RecModel]) -> None:
    """The DeepRecSys engine (CPU worker processes) through the server: same answers."""
    from recserve.server.repository import rec_engine_factory

    model = build_model("wnd", "tiny", seed=4)
    settings = ServerSettings(
        http_port=0, grpc_port=0, serving=ServingConfig(max_inflight_batches=4)
    )
    batches = [query(model.config, b, seed=b) for b in (1, 7, 30)]
    with ServerThread(settings, rec_engine_factory, models={"wnd": model}) as server:

        def call(i: int) -> np.ndarray:
            client = HTTPClient(server.http_url) if i % 2 else GRPCClient(server.grpc_url)
            try:
                return client.infer("wnd", model.config, batches[i // 2])
            finally:
                client.close()

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(call, range(2 * len(batches))))
    for i, scores in enumerate(results):
        np.testing.assert_allclose(scores, reference(model, batches[i // 2]), rtol=1e-5, atol=1e-6)


def test_engine_with_a_runner_process_behind_the_server() -> None:
    """The engine's batch runner in a process of its own (here on the CPU, as on a GPU
    machine): requests through HTTP and gRPC get the model's answers."""
    from recserve.engine import EngineConfig, RecEngine, SchedConfig

    def factory(model: torch.nn.Module, serving: ServingConfig) -> RecEngine:
        sched = SchedConfig(sub_batch_size=None, gpu_threshold=0, gpu_max_batch=1024)
        return RecEngine(model, EngineConfig(sched, cpu_workers=0, device="cpu"))

    model = build_model("wnd", "tiny", seed=5)
    settings = ServerSettings(
        http_port=0, grpc_port=0, serving=ServingConfig(max_inflight_batches=3)
    )
    batches = [query(model.config, b, seed=b) for b in (2, 9, 64)]
    with ServerThread(settings, factory, models={"wnd": model}) as server:
        for i, batch in enumerate(batches * 2):
            client = HTTPClient(server.http_url) if i % 2 else GRPCClient(server.grpc_url)
            try:
                scores = client.infer("wnd", model.config, batch)
            finally:
                client.close()
            np.testing.assert_allclose(scores, reference(model, batch), rtol=1e-5, atol=1e-6)


class FailingModel(nn.Module):
    """Fails every batch whose first dense value is negative; answers the others."""

    def __init__(self, inner: RecModel) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, batch: Batch) -> torch.Tensor:
        if float(batch.dense[0, 0]) < 0:
            raise RuntimeError("the model failed on purpose")
        return self.inner(batch)


@pytest.mark.parametrize("frontends", [0, 1])
def test_an_engine_failure_is_answered_and_serving_goes_on(frontends: int) -> None:
    inner = build_model("wnd", "tiny")
    settings = ServerSettings(http_port=0, grpc_port=0, frontends=frontends)
    good = query(inner.config, 3, seed=1)
    good.dense[0, 0] = 1.0
    bad = query(inner.config, 3, seed=2)
    bad.dense[0, 0] = -1.0
    with ServerThread(settings, models={"m": FailingModel(inner)}) as server:
        http, grpc_client = HTTPClient(server.http_url), GRPCClient(server.grpc_url)
        try:
            for client in (http, grpc_client):
                with pytest.raises(InferError, match="the model failed on purpose") as info:
                    client.infer("m", inner.config, bad)
                assert info.value.status in (500, "INTERNAL")
                np.testing.assert_allclose(
                    client.infer("m", inner.config, good), reference(inner, good), rtol=1e-6
                )
        finally:
            http.close()
            grpc_client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_rec_engine_process_refuses_overload_and_loses_nothing(protocol: str) -> None:
    """Front ends send straight to the rec engine's process; with room for one request there,
    concurrent callers get the overload status or the right scores, and the metrics (which
    front ends report) count both."""
    from recserve.server.repository import rec_engine_factory

    model = build_model("wnd", "tiny", seed=6)
    serving = ServingConfig(engine_queue=1, max_queue_requests=1, max_inflight_batches=1)
    settings = ServerSettings(http_port=0, grpc_port=0, frontends=1, serving=serving)
    batches = [query(model.config, 1 + i % 7, seed=i) for i in range(48)]
    expected = [reference(model, b) for b in batches]
    with ServerThread(settings, rec_engine_factory, models={"wnd": model}) as server:
        outcomes = concurrent_calls(
            server, protocol, "wnd", model, batches, expected, rtol=1e-5, atol=1e-6
        )
        refused = "429" if protocol == "http" else "RESOURCE_EXHAUSTED"
        ok = [i for i, o in enumerate(outcomes) if o == "ok"]
        assert len(ok) + outcomes.count(refused) == len(batches), Counter(outcomes)
        assert ok and outcomes.count(refused), Counter(outcomes)
        failures = f'recserve_request_failures_total{{model="wnd",protocol="{protocol}",reason="overloaded"}}'
        wait_until(lambda: metric(server, failures) == outcomes.count(refused))
        items = sum(batches[i].batch_size for i in ok)
        wait_until(lambda: metric(server, 'recserve_items_total{model="wnd"}') == items)
        assert server.server.core.repository.get("wnd").engine.stats()["rejected"] > 0
