"""Front-end processes: the frame format they speak, and a front end that dies is replaced."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import mmap
import os
import signal
from typing import Any

import numpy as np
import pytest
from server_helpers import query, reference, wait_until

from recserve.models import build_model
from recserve.server import InvalidArgument, ServerSettings, ServerThread, ipc
from recserve.server.client import GRPCClient, HTTPClient, batch_tensors
from recserve.server.engine_host import batch_from_frame


@pytest.mark.parametrize(
    ("buffer_bytes", "direct_bytes"),
    [(1 << 16, 1 << 15), (64, 16), (64, 1 << 30)],
    ids=["default", "large-parts-in-place", "buffer-grows"],
)
def test_frames_round_trip_through_the_protocol(buffer_bytes: int, direct_bytes: int) -> None:
    """Frames split at every byte boundary, or many in one read, arrive whole and in order,
    arrays aligned and equal; each frame's binary part is its own (later reads never touch
    it)."""
    arrays = [
        np.arange(5, dtype=np.float32),  # 20 bytes: padded to 24
        np.array([], dtype=np.int64),
        np.arange(-3, 4, dtype=np.int64),
    ]
    big = [np.arange(3000, dtype=np.int64)]  # 24 KB: past the buffer of the small cases
    frames = [({"op": "x", "k": [1, 2]}, arrays), ({"op": "y"}, []), ({"op": "z"}, big)] * 2
    wire = b"".join(bytes(p) for meta, arr in frames for p in ipc.frame(dict(meta), arr))
    for step in (1, 3, 7, 64, 5000, len(wire)):
        got: list[tuple[dict, bytearray]] = []
        proto = ipc.FrameProtocol(
            lambda meta, data, got=got: got.append((meta, data)), None, buffer_bytes, direct_bytes
        )
        pos = 0
        while pos < len(wire):
            buf = proto.get_buffer(-1)
            n = min(step, len(buf), len(wire) - pos)
            buf[:n] = wire[pos : pos + n]
            proto.buffer_updated(n)
            pos += n
        assert [m["op"] for m, _ in got] == ["x", "y", "z"] * 2, step
        for i in (0, 3):
            meta, data = got[i]
            assert meta["k"] == [1, 2] and all(off % 8 == 0 for off in meta["arrays"])
            for a, off in zip(arrays, meta["arrays"], strict=True):
                np.testing.assert_array_equal(ipc.array(data, off, a.dtype.str, a.size), a)
        assert got[1][1] == bytearray() == got[4][1]
        for i in (2, 5):
            np.testing.assert_array_equal(ipc.array(got[i][1], 0, "<i8", 3000), big[0])


def test_batch_from_frame_equals_the_batch_sent() -> None:
    model = build_model("dlrm-rmc2", "tiny")
    batch = query(model.config, 5)
    sparse = batch.sparse
    parts = ipc.frame(
        {"b": 5, "n_values": sparse.values.numel()},
        [batch.dense.numpy(), sparse.values.numpy(), sparse.offsets.numpy()],
    )
    meta = json.loads(bytes(parts[1]))
    data = bytearray(b"".join(bytes(p) for p in parts[2:]))
    got = batch_from_frame(model.config, meta, data)
    np.testing.assert_array_equal(reference(model, got), reference(model, batch))
    with pytest.raises(InvalidArgument, match="malformed batch"):
        batch_from_frame(model.config, {**meta, "n_values": 10**6}, data)


def test_a_dead_front_end_is_replaced_and_serving_goes_on() -> None:
    model = build_model("wnd", "tiny", seed=3)
    settings = ServerSettings(http_port=0, grpc_port=0, frontends=2, grace_s=5.0)
    batch = query(model.config, 6)
    expected = reference(model, batch)
    with ServerThread(settings, models={"wnd": model}) as server:
        hub = server.server._hub
        assert hub is not None and len(hub.processes) == 2
        victim = hub.processes[0]
        os.kill(victim.pid, signal.SIGKILL)
        wait_until(lambda: hub.restarts == 1 and hub.processes[0] is not victim, 30)
        wait_until(lambda: hub._ready == 2, 60)
        assert hub.processes[0].is_alive() and hub.processes[1].is_alive()
        before = dict(hub.handed)
        for _ in range(6):  # fresh connections: HTTP ones alternate between the front ends
            for client in (HTTPClient(server.http_url), GRPCClient(server.grpc_url)):
                np.testing.assert_allclose(
                    client.infer("wnd", model.config, batch), expected, rtol=1e-6
                )
                client.close()
        assert {i: hub.handed[i] - before.get(i, 0) for i in (0, 1)} == {0: 3, 1: 3}
    assert not any(p.is_alive() for p in hub.processes)


def test_arena_first_fit_reuses_freed_space(tmp_path) -> None:  # type: ignore[no-untyped-def]
    arena = ipc.Arena(str(tmp_path / "a"), 1000)
    assert arena.size == mmap.PAGESIZE  # whole pages (the GPU runner locks whole pages)
    a, b, c = arena.alloc(100), arena.alloc(200), arena.alloc(300)
    assert a == (0, 128) and b == (128, 384) and c == (384, 704)
    assert arena.alloc(arena.size - 704 + 1) is None  # more than is left at the end
    arena.free(b)
    assert arena.alloc(256) == (128, 384)  # the freed gap, lowest address first
    arena.free(a)
    arena.free(c)
    placed = arena.write([np.arange(3, dtype=np.float32), np.arange(5, dtype=np.int64)])
    assert placed is not None
    (start, end), offsets = placed
    assert start == 0 and offsets == [0, 16]
    view = arena.view((start, end))
    np.testing.assert_array_equal(ipc.array(view, 16, "<i8", 5), np.arange(5))
    other = ipc.Arena(arena.path, 1024, create=False)  # the server process's mapping
    np.testing.assert_array_equal(ipc.array(other.view((start, end)), 0, "<f4", 3), np.arange(3))
    with pytest.raises(ValueError, match="outside the arena"):
        other.view((1000, 2000))
    del view
    arena.close()
    other.close()


def test_arena_staging_gives_its_block_back_once_no_decode_writes_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A request decoded into the arena: the batch is right and lives in the block; released
    (answered, or its validation failed after staging), the block is free; while a decode still
    writes on a worker thread (its request cancelled), the block waits for it."""
    from recserve.models import get_config
    from recserve.server.frontend_process import ArenaStaging
    from recserve.server.http_codec import decode_infer_request
    from recserve.server.protocol import ModelSignature

    config = get_config("wnd", "tiny")
    sig = ModelSignature(config, max_items=64)
    arena = ipc.Arena(str(tmp_path / "arena"), 1 << 20)
    batch = query(config, 9)
    body, header = http_body(batch, config)

    staging = ArenaStaging(arena)
    decoded = decode_infer_request(body, header, sig, staging)
    np.testing.assert_array_equal(decoded.batch.sparse.values, batch.sparse.values)
    np.testing.assert_array_equal(decoded.batch.dense, batch.dense)
    assert staging.placed is not None and arena.live_blocks == 1
    block, offsets = staging.placed
    view = arena.view(block)
    np.testing.assert_array_equal(
        ipc.array(view, offsets[1], "<i8", batch.sparse.values.numel()), batch.sparse.values
    )
    del view
    staging.release()
    assert arena.live_blocks == 0

    bad = query(config, 9)
    bad.sparse.values[0] = 10**9  # out of range: caught after the arrays are staged
    body, header = http_body(bad, config)
    staging = ArenaStaging(arena)
    with pytest.raises(InvalidArgument, match="out of range"):
        decode_infer_request(body, header, sig, staging)
    assert arena.live_blocks == 1
    staging.release()
    assert arena.live_blocks == 0

    staging = ArenaStaging(arena)
    decode_infer_request(*http_body(batch, config), sig, staging)
    writer: concurrent.futures.Future[None] = concurrent.futures.Future()
    staging.writer = writer  # a decode still running on a worker thread
    staging.release()
    assert arena.live_blocks == 1
    writer.set_result(None)
    assert arena.live_blocks == 0
    del decoded
    arena.close()


def test_a_front_end_sends_the_staged_block_itself(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A request decoded into the arena goes to the engine as that block (no second copy
    into the arena); one decoded without staging is copied in, and its block freed after."""
    from recserve.models import get_config
    from recserve.server.frontend_process import ArenaStaging, FrontendCore, RemoteModel
    from recserve.server.http_codec import decode_infer_request
    from recserve.server.protocol import ModelSignature

    config = get_config("wnd", "tiny")
    sig = ModelSignature(config, max_items=64)
    arena = ipc.Arena(str(tmp_path / "arena"), 1 << 20)
    core = FrontendCore(ServerSettings(), arena)
    sent: list[dict[str, Any]] = []

    class Engine:  # stands in for the engine process's connection
        async def call(self, meta, arrays=(), stale=False):  # type: ignore[no-untyped-def]
            sent.append(meta)
            block, pos = meta["shm"], meta["arrays"]
            b = meta["b"]
            dense = ipc.array(arena.view(block), pos[0], "<f4", b * config.num_dense)
            scores = dense.reshape(b, -1).sum(axis=1, keepdims=True).astype("<f4")
            return {"shape": [b, 1], "arrays": [0], "queue_s": 0.0, "compute_s": 0.0}, bytearray(
                scores.tobytes()
            )

    async def engine(address: str) -> Engine:
        return Engine()

    core._engine = engine  # type: ignore[assignment,method-assign]
    served = RemoteModel("wnd", sig, generation=1, engine="engine.sock")
    batch = query(config, 5)
    expected = batch.dense.numpy().sum(axis=1, keepdims=True)

    async def run() -> None:
        staging = ArenaStaging(arena)
        decoded = decode_infer_request(*http_body(batch, config), sig, staging)
        assert staging.placed is not None
        result = await core.infer(served, decoded.batch, staging)
        assert sent[-1]["shm"] == staging.placed[0] and arena.live_blocks == 1
        np.testing.assert_allclose(result.scores.numpy(), expected, rtol=1e-6)
        staging.release()
        decoded = decode_infer_request(*http_body(batch, config), sig)  # not staged
        result = await core.infer(served, decoded.batch)
        assert arena.live_blocks == 0 and len(sent) == 2  # copied in, then given back
        np.testing.assert_allclose(result.scores.numpy(), expected, rtol=1e-6)

    asyncio.run(run())
    core.executor.shutdown()
    arena.close()


def http_body(batch: Any, config: Any) -> tuple[bytearray, int]:
    inputs, blobs = [], []
    for name, datatype, shape, data in batch_tensors(batch, config):
        size = {"binary_data_size": data.nbytes}
        inputs.append({"name": name, "datatype": datatype, "shape": shape, "parameters": size})
        blobs.append(bytes(data))
    header = json.dumps({"inputs": inputs}).encode()
    return bytearray(header + b"".join(blobs)), len(header)


def test_front_ends_send_requests_to_the_engine_process_directly(repo) -> None:  # type: ignore[no-untyped-def]
    """With the rec engine, front ends send decoded batches straight to its process: right
    answers over HTTP and gRPC, none through the server process's batcher; after an unload
    and load the front ends find the new engine process; a dead engine process is answered
    503 / UNAVAILABLE and the server goes on."""
    from recserve.models import load_model
    from recserve.server.client import InferError
    from recserve.server.repository import rec_engine_factory

    model = load_model(repo / "wnd")
    batches = [query(model.config, b, seed=b) for b in (1, 5, 33)]
    settings = ServerSettings(
        repository=repo, models=("wnd",), http_port=0, grpc_port=0, frontends=2, grace_s=5.0
    )

    def check_all(server: ServerThread) -> None:
        answers_over_both_protocols(server, "wnd", model, batches)

    with ServerThread(settings, rec_engine_factory) as server:
        core = server.server.core
        check_all(server)
        served = core.repository.get("wnd")
        assert served.engine.stats()["accepted"] == 2 * len(batches)
        text = core.metrics.render().decode()
        assert 'recserve_batch_requests_count{model="wnd"} 0.0' in text  # no batcher call
        assert 'recserve_requests_total{model="wnd",protocol="http"} 3.0' in text

        http = tritonclient_http(server)
        http.unload_model("wnd")
        http.load_model("wnd")
        fresh = core.repository.get("wnd")
        assert fresh.engine.address != served.engine.address
        check_all(server)
        assert fresh.engine.stats()["accepted"] == 2 * len(batches)

        os.kill(fresh.engine.pid, signal.SIGKILL)
        for client in (HTTPClient(server.http_url), GRPCClient(server.grpc_url)):
            with pytest.raises(InferError, match="503|UNAVAILABLE"):
                client.infer("wnd", model.config, batches[0])
            client.close()
        assert http.is_server_live()


def test_busy_polling_front_end_and_engine_answer_the_same(repo) -> None:  # type: ignore[no-untyped-def]
    """With ``busy_poll_us`` the front end's event loop and the engine's loop poll for the
    answers they wait on; the answers are the same and the engine runs with the setting."""
    from recserve.models import load_model
    from recserve.server.repository import rec_engine_factory
    from recserve.server.settings import ServingConfig

    model = load_model(repo / "wnd")
    settings = ServerSettings(
        repository=repo,
        models=("wnd",),
        http_port=0,
        grpc_port=0,
        frontends=1,
        grace_s=5.0,
        serving=ServingConfig(busy_poll_us=300),
    )
    with ServerThread(settings, rec_engine_factory) as server:
        batches = [query(model.config, b, seed=b) for b in (1, 17)]
        answers_over_both_protocols(server, "wnd", model, batches)
        stats = server.server.core.repository.get("wnd").engine.stats()
        assert stats["busy_poll_us"] == 300 and stats["accepted"] == 4


def answers_over_both_protocols(
    server: ServerThread, name: str, model: Any, batches: list[Any]
) -> None:
    """Each batch over HTTP and gRPC (own clients) is answered with the model's scores."""
    for batch in batches:
        for client in (HTTPClient(server.http_url), GRPCClient(server.grpc_url)):
            try:
                got = client.infer(name, model.config, batch)
            finally:
                client.close()
            np.testing.assert_allclose(got, reference(model, batch), rtol=1e-5, atol=1e-6)


def tritonclient_http(server: ServerThread):  # type: ignore[no-untyped-def]
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(server.http_url.split("://")[-1])
