"""Splitting and joining ModelInferRequest bytes agrees with protobuf, and never crashes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from recserve.server.errors import InvalidArgument
from recserve.server.grpc_wire import join_infer_request, split_infer_request

names = st.text(max_size=12)


@st.composite
def requests(draw: st.DrawFn) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(
        model_name=draw(names), model_version=draw(names), id=draw(names)
    )
    for _ in range(draw(st.integers(0, 4))):
        tensor = request.inputs.add(
            name=draw(names), datatype=draw(st.sampled_from(["INT64", "FP32"])),
            shape=draw(st.lists(st.integers(-(2**40), 2**40), max_size=3)),
        )  # fmt: skip
        tensor.contents.int64_contents.extend(
            draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3))
        )
        if draw(st.booleans()):
            tensor.parameters["binary_data_size"].int64_param = draw(st.integers(0, 2**40))
    for _ in range(draw(st.integers(0, 2))):
        request.outputs.add(name=draw(names))
    if draw(st.booleans()):
        request.parameters["priority"].uint64_param = draw(st.integers(0, 2**64 - 1))
    request.raw_input_contents.extend(draw(st.lists(st.binary(max_size=300), max_size=5)))
    return request


@settings(max_examples=200, deadline=None)
@given(requests())
def test_split_and_join_agree_with_protobuf(request: service_pb2.ModelInferRequest) -> None:
    data = request.SerializeToString()
    header, raw, may_use_shm = split_infer_request(data)
    assert [bytes(r) for r in raw] == list(request.raw_input_contents)
    assert not may_use_shm  # no tensor here names a region (names are under 13 characters)
    expected = service_pb2.ModelInferRequest()
    expected.CopyFrom(request)
    del expected.raw_input_contents[:]
    assert header == expected
    joined = join_infer_request(header, raw)
    assert service_pb2.ModelInferRequest.FromString(joined) == request


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_is_refused_or_parsed_as_protobuf_does(data: bytes) -> None:
    try:
        header, raw, _ = split_infer_request(data)
    except InvalidArgument:
        return
    expected = service_pb2.ModelInferRequest.FromString(data)  # split accepts only valid input
    assert [bytes(r) for r in raw] == list(expected.raw_input_contents)
    assert header.model_name == expected.model_name and len(header.inputs) == len(expected.inputs)


def test_truncated_raw_contents_are_refused() -> None:
    request = service_pb2.ModelInferRequest(model_name="m")
    request.raw_input_contents.append(b"x" * 100)
    data = request.SerializeToString()
    for cut in (1, 50, 99):
        try:
            split_infer_request(data[:-cut])
        except InvalidArgument as e:
            assert "truncated" in str(e)
        else:
            raise AssertionError("a truncated request was accepted")


def test_a_tensor_in_shared_memory_is_noticed() -> None:
    for where in ("input", "output"):
        request = service_pb2.ModelInferRequest(model_name="m")
        tensor = request.inputs.add(name="a", datatype="INT64", shape=[2])
        request.raw_input_contents.append(b"\0" * 16)
        if where == "output":
            tensor = request.outputs.add(name="out")
        tensor.parameters["shared_memory_region"].string_param = "r"
        assert split_infer_request(request.SerializeToString()).may_use_shared_memory
