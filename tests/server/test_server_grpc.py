"""The real server over gRPC: tritonclient.grpc unchanged, typed contents, errors, repository."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from server_helpers import MAX_BODY, MAX_ITEMS, REPO_MODELS, query, reference, triton_inputs
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from recserve.models import RecModel
from recserve.server import ServerThread
from recserve.server.client import GRPCClient, InferError, batch_tensors


@pytest.fixture(scope="module")
def client(server: ServerThread) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(server.grpc_url)


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> service_pb2_grpc.GRPCInferenceServiceStub:
    channel = grpc.insecure_channel(
        server.grpc_url, options=[("grpc.max_send_message_length", 4 * MAX_BODY)]
    )
    return service_pb2_grpc.GRPCInferenceServiceStub(channel)


def test_health_and_metadata(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata().name == "recserve"
    for name in REPO_MODELS:
        assert client.is_model_ready(name)
    assert not client.is_model_ready("missing")
    assert not client.is_model_ready("wnd", "9")
    meta = client.get_model_metadata("dlrm-rmc2", as_json=True)
    names = [t["name"] for t in meta["inputs"]]
    assert names[:3] == ["dense", "t0.values", "t0.offsets"]
    config = client.get_model_config("wnd").config
    assert config.name == "wnd" and config.parameters["max_items"].string_value == str(MAX_ITEMS)
    assert [o.name for o in config.output] == ["scores"]


@pytest.mark.parametrize("name", REPO_MODELS)
def test_infer_equals_in_process(
    client: grpcclient.InferenceServerClient, models: dict[str, RecModel], name: str
) -> None:
    model = models[name]
    batch = query(model.config, 9, seed=5)
    result = client.infer(
        name,
        triton_inputs(grpcclient, batch, model.config),
        outputs=[grpcclient.InferRequestedOutput("scores")],
        request_id="g9",
    )
    np.testing.assert_allclose(result.as_numpy("scores"), reference(model, batch), rtol=1e-6)
    assert result.get_response().id == "g9"


def test_typed_contents_and_own_client(
    server: ServerThread,
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
    models: dict[str, RecModel],
) -> None:
    model = models["mt-wnd"]
    batch = query(model.config, 4)
    request = service_pb2.ModelInferRequest(model_name="mt-wnd")
    for name, datatype, shape, data in batch_tensors(batch, model.config):
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        if datatype == "FP32":
            tensor.contents.fp32_contents.extend(np.frombuffer(data, dtype="<f4").tolist())
        else:
            tensor.contents.int64_contents.extend(np.frombuffer(data, dtype="<i8").tolist())
    response = stub.ModelInfer(request, timeout=30)
    scores = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(4, 3)
    np.testing.assert_allclose(scores, reference(model, batch), rtol=1e-6)
    own = GRPCClient(server.grpc_url)
    try:
        np.testing.assert_allclose(
            own.infer("mt-wnd", model.config, batch), reference(model, batch), rtol=1e-6
        )
        with pytest.raises(InferError) as err:
            own.infer("nope", model.config, batch)
        assert err.value.status == "NOT_FOUND"
    finally:
        own.close()


def infer_error(stub: service_pb2_grpc.GRPCInferenceServiceStub, request: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, timeout=30)
    return err.value


def _established_to(port: int) -> int:
    """TCP connections of this machine in state ESTABLISHED whose remote port is ``port`` (the
    clients' ends of connections to a local server)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    count += 1
    return count


def test_each_own_client_has_a_connection_of_its_own(
    server: ServerThread, models: dict[str, RecModel]
) -> None:
    """Front-end processes share the gRPC port, and the kernel spreads connections over them:
    clients that shared one connection (grpcio's default within a process) would all load the
    same front end."""
    port = int(server.grpc_url.rsplit(":", 1)[1])
    model = models["ncf"]
    before = _established_to(port)
    clients = [GRPCClient(server.grpc_url) for _ in range(3)]
    try:
        for client in clients:
            client.infer("ncf", model.config, query(model.config, 2))
        assert _established_to(port) - before == 3
    finally:
        for client in clients:
            client.close()


def wnd_request(model: RecModel, batch_size: int = 4) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="wnd")
    for name, datatype, shape, data in batch_tensors(
        query(model.config, batch_size, jitter=False), model.config
    ):
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(bytes(data))
    return request


def test_bad_inputs_are_invalid_argument(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, models: dict[str, RecModel]
) -> None:
    model = models["wnd"]

    def edited(edit) -> service_pb2.ModelInferRequest:  # type: ignore[no-untyped-def]
        request = wnd_request(model)
        edit(request)
        return request

    def set_raw(name: str, values: list[int]):  # type: ignore[no-untyped-def]
        def edit(request: service_pb2.ModelInferRequest) -> None:
            i = [t.name for t in request.inputs].index(name)
            request.inputs[i].ClearField("shape")
            request.inputs[i].shape.append(len(values))
            request.raw_input_contents[i] = np.asarray(values, dtype="<i8").tobytes()

        return edit

    def drop_dense(request: service_pb2.ModelInferRequest) -> None:
        del request.inputs[0]
        del request.raw_input_contents[0]

    def nan(request: service_pb2.ModelInferRequest) -> None:
        dense = np.frombuffer(request.raw_input_contents[0], dtype="<f4").copy()
        dense[2] = np.inf
        request.raw_input_contents[0] = dense.tobytes()

    def short_raw(request: service_pb2.ModelInferRequest) -> None:
        request.raw_input_contents[1] = request.raw_input_contents[1][:-1]

    def fewer_raw(request: service_pb2.ModelInferRequest) -> None:
        del request.raw_input_contents[-1]

    def extra_output(request: service_pb2.ModelInferRequest) -> None:
        request.outputs.add(name="logits")

    def fp64(request: service_pb2.ModelInferRequest) -> None:
        request.inputs[0].datatype = "FP64"

    cases = [
        (drop_dense, ["missing input tensor 'dense'"]),
        (set_raw("t0.values", [0, 1, 2, 999]), ["'t0'", "out of range"]),
        (set_raw("t1.values", [0, -1, 2, 3]), ["'t1'", "negative"]),
        (set_raw("t2.offsets", [0, 1, 2, 5, 4]), ["'t2'", "decrease"]),
        (nan, ["dense", "Inf"]),
        (short_raw, ["'t0.values'", "bytes"]),
        (fewer_raw, ["raw_input_contents"]),
        (extra_output, ["unknown output 'logits'"]),
        (fp64, ["'dense'", "FP32"]),
    ]
    for edit, words in cases:
        error = infer_error(stub, edited(edit))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        for word in words:
            assert word in error.details()
    error = infer_error(stub, wnd_request(model, MAX_ITEMS + 1))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'dense'" in error.details() and "over the limit" in error.details()
    request = wnd_request(model)
    request.model_name = "../wnd"
    assert infer_error(stub, request).code() == grpc.StatusCode.INVALID_ARGUMENT
    request.model_name, request.model_version = "wnd", "2"
    assert infer_error(stub, request).code() == grpc.StatusCode.NOT_FOUND
    request.model_name, request.model_version = "nope", ""
    assert infer_error(stub, request).code() == grpc.StatusCode.NOT_FOUND


def test_oversized_message_and_unimplemented_rpc(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, client: grpcclient.InferenceServerClient
) -> None:
    request = service_pb2.ModelInferRequest(model_name="wnd")
    request.inputs.add(name="dense", datatype="FP32", shape=[MAX_BODY // 64, 16])
    request.raw_input_contents.append(b"\0" * (MAX_BODY + 64))
    assert infer_error(stub, request).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name="wnd"), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert client.is_server_live()


def test_unload_and_load(
    client: grpcclient.InferenceServerClient, models: dict[str, RecModel]
) -> None:
    client.unload_model("din")
    try:
        assert not client.is_model_ready("din")
        index = {m.name: m.state for m in client.get_model_repository_index().models}
        assert index["din"] == "UNAVAILABLE"
        with pytest.raises(InferenceServerException, match="not loaded"):
            model = models["din"]
            client.infer("din", triton_inputs(grpcclient, query(model.config, 2), model.config))
    finally:
        client.load_model("din")
    assert client.is_model_ready("din")
    with pytest.raises(InferenceServerException, match="invalid model name"):
        client.load_model("../../etc")
    with pytest.raises(InferenceServerException, match="no model 'absent'"):
        client.load_model("absent")
