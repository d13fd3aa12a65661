"""System shared memory over HTTP and gRPC: tritonclient's own shared-memory calls, inputs and
outputs through registered regions, status and errors (one server process, and front ends)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from server_helpers import query, reference
from tritonclient.utils import InferenceServerException

from recserve.models import RecModel
from recserve.server import ServerThread
from recserve.server.client import batch_tensors
from recserve.server.errors import InvalidArgument
from recserve.server.shm import SystemSharedMemory

PROTOCOLS = {"http": httpclient, "grpc": grpcclient}


@pytest.fixture(params=["http", "grpc"])
def client(server: ServerThread, request: pytest.FixtureRequest) -> Iterator[Any]:
    module = PROTOCOLS[request.param]
    url = server.http_url if request.param == "http" else server.grpc_url
    c = module.InferenceServerClient(url)
    yield c
    c.unregister_system_shared_memory()
    c.close()


class Regions:
    """POSIX shared-memory regions made as a user would, removed after the test."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def make(self, nbytes: int) -> tuple[str, str, Any]:
        name = f"r{uuid.uuid4().hex[:10]}"
        handle = shm.create_shared_memory_region(name, "/recserve_test_" + name, nbytes)
        self.handles.append(handle)
        return name, "/recserve_test_" + name, handle

    def close(self) -> None:
        for handle in self.handles:
            shm.destroy_shared_memory_region(handle)


@pytest.fixture
def regions() -> Iterator[Regions]:
    r = Regions()
    yield r
    r.close()


def _shm_inputs(module: Any, batch: Any, config: Any, region: str, handle: Any) -> list[Any]:
    """Every input of ``batch`` placed back to back in one registered region."""
    inputs, arrays, offset = [], [], 0
    for name, datatype, shape, data in batch_tensors(batch, config):
        array = np.frombuffer(data, dtype=np.float32 if datatype == "FP32" else np.int64)
        tensor = module.InferInput(name, shape, datatype)
        tensor.set_shared_memory(region, array.nbytes, offset)
        inputs.append(tensor)
        arrays.append(array)
        offset += array.nbytes
    shm.set_shared_memory_region(handle, arrays)
    return inputs


def _nbytes(batch: Any, config: Any) -> int:
    return sum(len(bytes(d)) for *_, d in batch_tensors(batch, config))


@pytest.mark.parametrize("name", ["dlrm-rmc2", "wnd"])
def test_inputs_and_outputs_through_shared_memory(
    client: Any, models: dict[str, RecModel], regions: Regions, name: str
) -> None:
    module = PROTOCOLS["http" if isinstance(client, httpclient.InferenceServerClient) else "grpc"]
    model = models[name]
    batch = query(model.config, 11, seed=3)
    need = _nbytes(batch, model.config)
    inp, inp_key, inp_handle = regions.make(need)
    out, out_key, out_handle = regions.make(64 + 11 * 4)
    client.register_system_shared_memory(inp, inp_key, need)
    client.register_system_shared_memory(out, out_key, 64 + 11 * 4)
    inputs = _shm_inputs(module, batch, model.config, inp, inp_handle)
    requested = module.InferRequestedOutput("scores")
    requested.set_shared_memory(out, 11 * 4, offset=64)
    result = client.infer(name, inputs, outputs=[requested])
    scores = shm.get_contents_as_numpy(out_handle, np.float32, [11, 1], offset=64)
    np.testing.assert_allclose(scores, reference(model, batch), rtol=1e-5, atol=1e-6)
    output = result.get_output("scores")  # the scores are in the region, not the answer
    params = output["parameters"] if isinstance(output, dict) else output.parameters
    region_name = params["shared_memory_region"]
    assert getattr(region_name, "string_param", region_name) == out
    assert not getattr(result.get_response(), "raw_output_contents", None)
    # the same inputs with the answer in the response
    result = client.infer(name, inputs, outputs=[module.InferRequestedOutput("scores")])
    np.testing.assert_allclose(
        result.as_numpy("scores"), reference(model, batch), rtol=1e-5, atol=1e-6
    )


def test_status_lists_registrations_and_unregister_removes_them(
    client: Any, regions: Regions
) -> None:
    a, a_key, _ = regions.make(1024)
    b, b_key, _ = regions.make(2048)
    client.register_system_shared_memory(a, a_key, 1000, offset=24)
    client.register_system_shared_memory(b, b_key, 2048)
    found = {r["name"]: r for r in _status(client)}
    assert found[a]["key"] == a_key and int(found[a]["byte_size"]) == 1000
    assert int(found[a].get("offset", 0)) == 24 and int(found[b]["byte_size"]) == 2048
    with pytest.raises(InferenceServerException, match="already registered"):
        client.register_system_shared_memory(a, a_key, 10)
    client.unregister_system_shared_memory(a)
    with pytest.raises(InferenceServerException, match="no shared memory region"):
        client.get_system_shared_memory_status(a)
    client.unregister_system_shared_memory()
    assert _status(client) == []


def test_bad_regions_are_refused_and_serving_goes_on(
    client: Any, models: dict[str, RecModel], regions: Regions
) -> None:
    module = PROTOCOLS["http" if isinstance(client, httpclient.InferenceServerClient) else "grpc"]
    model = models["wnd"]
    batch = query(model.config, 4, seed=1)
    with pytest.raises(InferenceServerException, match="no shared memory object"):
        client.register_system_shared_memory("ghost", "/recserve_test_missing", 64)
    small, small_key, _ = regions.make(256)
    with pytest.raises(InferenceServerException, match="past the end"):
        client.register_system_shared_memory(small, small_key, 512)
    need = _nbytes(batch, model.config)
    region, key, handle = regions.make(need)
    client.register_system_shared_memory(region, key, need)
    inputs = _shm_inputs(module, batch, model.config, region, handle)
    inputs[0].set_shared_memory(region, inputs_nbytes(batch, model.config), offset=need - 4)
    with pytest.raises(InferenceServerException, match="past the end of shared memory region"):
        client.infer("wnd", inputs)
    inputs[0].set_shared_memory("never-registered", 16)
    with pytest.raises(InferenceServerException, match="no shared memory region"):
        client.infer("wnd", inputs)
    client.unregister_system_shared_memory(region)  # then the region is gone for infer too
    inputs = _shm_inputs(module, batch, model.config, region, handle)
    with pytest.raises(InferenceServerException, match="no shared memory region"):
        client.infer("wnd", inputs)
    plain = module.InferInput("x", [1], "FP32")  # still serving: a plain request works
    assert plain is not None
    from server_helpers import triton_inputs

    result = client.infer("wnd", triton_inputs(module, batch, model.config))
    np.testing.assert_allclose(result.as_numpy("scores"), reference(model, batch), rtol=1e-5)


def _status(client: Any, name: str = "") -> list[dict[str, Any]]:
    """The registered regions as a list of dicts, over either protocol."""
    if isinstance(client, httpclient.InferenceServerClient):
        return list(client.get_system_shared_memory_status(name))
    status = client.get_system_shared_memory_status(name, as_json=True)
    return list(status.get("regions", {}).values())


def inputs_nbytes(batch: Any, config: Any) -> int:
    """Bytes of the first input (the dense features)."""
    return len(bytes(next(iter(batch_tensors(batch, config)))[3]))


def test_the_registry_is_shared_through_its_folder(tmp_path: Any) -> None:
    """What the server registers, a front end's reader of the same folder sees at once; a
    name registered again is remapped, and a removed one is refused."""
    root = tmp_path / "shm"
    root.mkdir()
    (root / "obj").write_bytes(bytes(range(256)))
    server = SystemSharedMemory(root=str(root))
    reader = SystemSharedMemory(server.folder, root=str(root))
    try:
        server.register("r", "/obj", 16, 64)
        assert bytes(reader.view("r", 0, 4, "t")) == bytes([16, 17, 18, 19])
        server.unregister("r")
        with pytest.raises(InvalidArgument, match="no shared memory region 'r'"):
            reader.view("r", 0, 4, "t")
        (root / "obj2").write_bytes(bytes(range(255, -1, -1)))
        server.register("r", "/obj2", 0, 8)
        assert bytes(reader.view("r", 0, 2, "t")) == bytes([255, 254])
        with pytest.raises(InvalidArgument, match="past the end"):
            reader.view("r", 4, 8, "t")
        reader.write("r", 0, b"\x01\x02", 2, "out")
        assert (root / "obj2").read_bytes()[:2] == b"\x01\x02"
        with pytest.raises(InvalidArgument, match="needs 3 bytes"):
            reader.write("r", 0, b"abc", 2, "out")
        for bad in ("obj", "/a/b", "/", ""):
            with pytest.raises(InvalidArgument, match="key"):
                server.register("x", bad, 0, 1)
    finally:
        reader.close()
        server.close()
    assert not os.path.exists(server.folder)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_recserve_clients_send_inputs_through_shared_memory(
    server: ServerThread, models: dict[str, RecModel], protocol: str
) -> None:
    """``HTTPClient`` / ``GRPCClient(shared_memory_bytes=...)`` make and register a region on
    their first call, answer like the model, and remove the region on close."""
    from recserve.server.client import GRPCClient, HTTPClient

    def make(nbytes: int) -> Any:
        if protocol == "http":
            return HTTPClient(server.http_url, shared_memory_bytes=nbytes)
        return GRPCClient(server.grpc_url, shared_memory_bytes=nbytes)

    model = models["dlrm-rmc2"]
    client = make(1 << 20)
    try:
        for seed in (1, 2):
            batch = query(model.config, 6, seed=seed)
            scores = client.infer("dlrm-rmc2", model.config, batch)
            np.testing.assert_allclose(scores, reference(model, batch), rtol=1e-5, atol=1e-6)
        region = client._shm
        assert region is not None and os.path.exists("/dev/shm/" + region.name)
        status = httpclient.InferenceServerClient(server.http_url)
        assert [r["name"] for r in status.get_system_shared_memory_status()] == [region.name]
    finally:
        client.close()
    assert status.get_system_shared_memory_status() == []
    assert not os.path.exists("/dev/shm/" + region.name)
    small = make(64)
    try:
        with pytest.raises(ValueError, match="more than 64 bytes"):
            small.infer("dlrm-rmc2", model.config, query(model.config, 6))
    finally:
        small.close()
    assert status.get_system_shared_memory_status() == []


def test_some_inputs_in_shared_memory_and_the_rest_in_the_request(
    client: Any, models: dict[str, RecModel], regions: Regions
) -> None:
    """Dense features in the request, ids in a region: each input read from where it is
    (gRPC's raw_input_contents then hold only the inputs not in shared memory)."""
    from server_helpers import triton_inputs

    module = PROTOCOLS["http" if isinstance(client, httpclient.InferenceServerClient) else "grpc"]
    model = models["dlrm-rmc2"]
    batch = query(model.config, 5, seed=9)
    need = _nbytes(batch, model.config)
    region, key, handle = regions.make(need)
    client.register_system_shared_memory(region, key, need)
    in_shm = _shm_inputs(module, batch, model.config, region, handle)
    plain = triton_inputs(module, batch, model.config)
    mixed = [plain[0], *in_shm[1:]]  # dense in the request
    result = client.infer("dlrm-rmc2", mixed)
    np.testing.assert_allclose(
        result.as_numpy("scores"), reference(model, batch), rtol=1e-5, atol=1e-6
    )
