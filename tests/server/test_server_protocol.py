"""Decoding named tensors into a Batch: the layout, and every bad input named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from server_helpers import query

from recserve.models import get_config
from recserve.server.errors import InvalidArgument
from recserve.server.http_codec import decode_infer_request, encode_infer_response
from recserve.server.protocol import ModelSignature, WireTensor, tensor_from_bytes, tensor_from_list


def wire(batch, config, lengths: bool = False) -> dict[str, WireTensor]:  # type: ignore[no-untyped-def]
    tensors = {}
    if config.num_dense:
        d = batch.dense.numpy()
        tensors["dense"] = WireTensor("dense", "FP32", d.shape, d.reshape(-1))
    for key in config.feature_keys:
        v, o = (t.numpy() for t in batch.sparse.feature(key))
        tensors[f"{key}.values"] = WireTensor(f"{key}.values", "INT64", v.shape, v)
        if lengths:
            n = np.diff(o)
            tensors[f"{key}.lengths"] = WireTensor(f"{key}.lengths", "INT64", n.shape, n)
        else:
            tensors[f"{key}.offsets"] = WireTensor(f"{key}.offsets", "INT64", o.shape, o)
    return tensors


def same(a, b) -> None:  # type: ignore[no-untyped-def]
    assert a.sparse.keys == b.sparse.keys
    assert torch.equal(a.dense, b.dense)
    assert torch.equal(a.sparse.values, b.sparse.values)
    assert torch.equal(a.sparse.offsets, b.sparse.offsets)


@pytest.mark.parametrize("name", ["wnd", "dlrm-rmc2", "ncf", "din", "dien", "mt-wnd"])
@pytest.mark.parametrize("lengths", [False, True])
def test_round_trip_offsets_and_lengths(name: str, lengths: bool) -> None:
    config = get_config(name, "tiny")
    sig = ModelSignature(config, max_items=100)
    batch = query(config, 9)
    same(sig.to_batch(wire(batch, config, lengths)), batch)


def test_signature_lists_inputs_and_output() -> None:
    config = get_config("ncf", "tiny")
    sig = ModelSignature(config, 10)
    required = [s.name for s in sig.inputs if not s.optional]
    assert required == [f"{k}.{p}" for k in config.feature_keys for p in ("values", "offsets")]
    assert {s.name for s in sig.inputs if s.optional} >= {"dense", "mf_user.lengths"}
    assert [s.metadata() for s in sig.outputs] == [
        {"name": "scores", "datatype": "FP32", "shape": [-1, 1]}
    ]


def bad(config, mutate, lengths: bool = False, max_items: int = 100):  # type: ignore[no-untyped-def]
    tensors = wire(query(config, 4, jitter=False), config, lengths)
    mutate(tensors)
    with pytest.raises(InvalidArgument) as err:
        ModelSignature(config, max_items).to_batch(tensors)
    return str(err.value)


def set_data(tensors, name, data) -> None:  # type: ignore[no-untyped-def]
    arr = np.asarray(data, dtype=tensors[name].data.dtype)
    t = tensors[name]
    tensors[name] = WireTensor(
        name, t.datatype, arr.shape if arr.ndim == 1 else t.shape, arr.reshape(-1)
    )


WND = get_config("wnd", "tiny")


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda t: t.pop("t1.values"), ["'t1.values'", "missing"]),
        (lambda t: t.pop("t2.offsets"), ["'t2.offsets'", "t2.lengths"]),
        (lambda t: t.pop("dense"), ["'dense'", "missing"]),
        (lambda t: set_data(t, "t0.offsets", [1, 2, 3, 4, 5]), ["'t0.offsets'", "start at 0"]),
        (lambda t: set_data(t, "t0.offsets", [0, 1, 2, 3, 999]), ["'t0.offsets'", "ids"]),
        (lambda t: set_data(t, "t0.offsets", [0, 1, 2]), ["'t0.offsets'", "B + 1"]),
        (lambda t: set_data(t, "t1.values", [-1] * t["t1.values"].data.size), ["'t1'", "negative"]),
        (
            lambda t: set_data(t, "t1.values", [10**6] * t["t1.values"].data.size),
            ["'t1'", "out of range"],
        ),
        (lambda t: t["dense"].data.__setitem__(3, np.nan), ["dense", "NaN"]),
        (lambda t: t["dense"].data.__setitem__(0, np.inf), ["dense", "Inf"]),
    ],
)
def test_bad_tensors_are_named(mutate, words) -> None:  # type: ignore[no-untyped-def]
    message = bad(WND, mutate)
    for word in words:
        assert word in message


def test_decreasing_offsets_named() -> None:
    def mutate(t):  # type: ignore[no-untyped-def]
        n = t["t0.values"].data.size
        set_data(t, "t0.values", list(range(4)) + [0] * max(0, n - 4))
        set_data(t, "t0.offsets", [0, 3, 1, 2, n])

    message = bad(WND, mutate)
    assert "'t0'" in message and "decrease" in message


def test_lengths_errors() -> None:
    def negative(t):  # type: ignore[no-untyped-def]
        n = t["t0.lengths"].data.copy()
        n[1] = -1
        set_data(t, "t0.lengths", n)

    assert "'t0.lengths'" in bad(WND, negative, lengths=True)
    assert "add up" in bad(WND, lambda t: set_data(t, "t0.lengths", [9, 9, 9, 9]), lengths=True)

    def both(t):  # type: ignore[no-untyped-def]
        t["t0.offsets"] = WireTensor("t0.offsets", "INT64", (5,), np.zeros(5, dtype=np.int64))

    assert "not both" in bad(WND, both, lengths=True)


def test_batch_limits() -> None:
    assert "over the limit of 3" in bad(WND, lambda t: None, max_items=3)

    def empty(t):  # type: ignore[no-untyped-def]
        t["dense"] = WireTensor("dense", "FP32", (0, 16), np.zeros(0, dtype=np.float32))

    assert "empty batch" in bad(WND, empty)


@pytest.mark.parametrize(
    ("name", "datatype", "shape", "words"),
    [
        ("t9.values", "INT64", [3], ["unexpected input tensor 't9.values'"]),
        ("t0.values", "INT32", [3], ["'t0.values'", "INT64", "INT32"]),
        ("dense", "FP32", [3, 15], ["'dense'", "[B, 16]"]),
        ("dense", "FP32", [48], ["'dense'"]),
        ("t0.values", "INT64", [3, 1], ["'t0.values'", "1-D"]),
        ("t0.offsets", "INT64", [-1], ["'t0.offsets'", ">= 0"]),
        (7, "INT64", [1], ["strings"]),
    ],
)
def test_header_checks(name, datatype, shape, words) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument) as err:
        ModelSignature(WND, 10).check_input(name, datatype, shape)
    for word in words:
        assert word in str(err.value)


def test_tensor_decoders() -> None:
    t = tensor_from_list("x", "INT64", (2, 2), [[1, 2], [3, 4]])
    assert t.data.tolist() == [1, 2, 3, 4] and t.data.dtype == np.int64
    assert tensor_from_list("x", "FP32", (2,), [1, 2.5]).data.dtype == np.float32
    for data, word in [
        ([1.5, 2], "integers"),
        (["a", "b"], "integers"),
        ([[1], [2, 3]], "integers"),
        ([True, False], "integers"),
        ([1, 2, 3], "3 elements"),
        ([2**63, 2**63], "range"),
        ([2**64, 1], "integers"),
    ]:
        with pytest.raises(InvalidArgument, match=word):
            tensor_from_list("x", "INT64", (2,), data)
    raw = np.arange(4, dtype="<i8").tobytes()
    assert tensor_from_bytes("x", "INT64", (4,), raw).data.tolist() == [0, 1, 2, 3]
    with pytest.raises(InvalidArgument, match="needs 32"):
        tensor_from_bytes("x", "INT64", (4,), raw[:-1])
    with pytest.raises(InvalidArgument, match="unsupported datatype"):
        tensor_from_bytes("x", "BYTES", (4,), raw)


def http_body(batch, config, binary: bool = True) -> tuple[bytes, int | None]:  # type: ignore[no-untyped-def]
    from recserve.server.client import batch_tensors

    inputs, blobs = [], []
    for name, datatype, shape, data in batch_tensors(batch, config):
        if binary:
            inputs.append(
                {
                    "name": name,
                    "datatype": datatype,
                    "shape": shape,
                    "parameters": {"binary_data_size": data.nbytes},
                }
            )
            blobs.append(bytes(data))
        else:
            dtype = np.float32 if datatype == "FP32" else np.int64
            inputs.append(
                {
                    "name": name,
                    "datatype": datatype,
                    "shape": shape,
                    "data": np.frombuffer(data, dtype=dtype).tolist(),
                }
            )
    header = json.dumps({"id": "q1", "inputs": inputs}).encode()
    return header + b"".join(blobs), (len(header) if binary else None)


@pytest.mark.parametrize("binary", [True, False])
def test_http_body_round_trip(binary: bool) -> None:
    batch = query(WND, 5)
    body, hlen = http_body(batch, WND, binary)
    request = decode_infer_request(body, hlen, ModelSignature(WND, 10))
    same(request.batch, batch)
    assert request.request_id == "q1" and request.outputs == [("scores", False)]
    scores = np.arange(5, dtype=np.float32).reshape(5, 1)
    payload, json_size = encode_infer_response("wnd", "1", request, scores)
    assert json_size is None and json.loads(payload)["outputs"][0]["data"] == list(range(5))
    request.outputs = [("scores", True)]
    payload, json_size = encode_infer_response("wnd", "1", request, scores)
    assert json_size is not None
    assert np.frombuffer(payload[json_size:], dtype="<f4").tolist() == list(range(5))


def test_http_body_errors() -> None:
    sig = ModelSignature(WND, 10)
    body, hlen = http_body(query(WND, 3), WND)
    assert hlen is not None
    cases = [
        (body[:-5], hlen, "truncated"),
        (body + b"xx", hlen, "2 bytes of binary data follow"),
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        (b'{"inputs": []}', None, "non-empty 'inputs'"),
        (b'{"inputs": [{"name": "dense", "datatype": "FP32", "shape": [1, 16]}]}', None, "no data"),
        (b'{"inputs": [{"name": "dense", "datatype": "FP32", "shape": "x"}]}', None, "'shape'"),
        (b"[" * 100000, None, "not valid JSON"),
    ]
    for data, length, word in cases:
        with pytest.raises(InvalidArgument, match=word):
            decode_infer_request(data, length, sig)
    header = json.loads(body[:hlen])
    header["outputs"] = [{"name": "probs"}]
    with pytest.raises(InvalidArgument, match="unknown output 'probs'"):
        text = json.dumps(header).encode()
        decode_infer_request(text + body[hlen:], len(text), sig)


def fast_args(tensors: dict[str, WireTensor], order: list[str] | None = None):  # type: ignore[no-untyped-def]
    names = order if order is not None else list(tensors)
    return (
        names,
        [tensors[n].datatype for n in names],
        [list(tensors[n].shape) for n in names],
        [tensors[n].data.tobytes() for n in names],
    )


@pytest.mark.parametrize("name", ["wnd", "dlrm-rmc2", "ncf", "din", "dien", "mt-wnd"])
def test_fast_path_equals_tensor_by_tensor(name: str) -> None:
    config = get_config(name, "tiny")
    sig = ModelSignature(config, max_items=100)
    batch = query(config, 9)  # bag sizes vary, empty bags included
    tensors = wire(batch, config)
    fast = sig.fast_batch(*fast_args(tensors, list(tensors)[::-1]))  # any order of the inputs
    assert fast is not None
    same(fast, batch)
    same(fast, sig.to_batch(tensors))
    fast.dense.add_(1)  # its own memory: writable, and never aliases the request's bytes
    fast.sparse.values.add_(1)
    assert torch.equal(sig.fast_batch(*fast_args(tensors)).dense, batch.dense)  # type: ignore[union-attr]


def test_fast_path_uses_a_writable_body_in_place() -> None:
    """An HTTP body is the request's own bytearray: the dense features are a view of it (no
    copy); read-only bytes (gRPC) are copied, as torch needs writable memory."""
    config = get_config("wnd", "tiny")
    sig = ModelSignature(config, max_items=100)
    batch = query(config, 5)
    names, datatypes, shapes, buffers = fast_args(wire(batch, config))
    owned = [memoryview(bytearray(b)) for b in buffers]
    fast = sig.fast_batch(names, datatypes, shapes, owned)
    assert fast is not None
    same(fast, batch)
    dense_buf = owned[names.index("dense")]
    np.frombuffer(dense_buf, "<f4")[0] += 1.0  # the body changes: so does the batch
    assert fast.dense[0, 0].item() == pytest.approx(batch.dense[0, 0].item() + 1.0)


@pytest.mark.parametrize("name", ["wnd", "dlrm-rmc2", "ncf", "din"])
def test_fast_path_decodes_into_the_staging_arrays(name: str) -> None:
    """With a staging callable the arrays are written where it says (a front end's arena);
    the batch is the same, and a staging that has no room leaves the decoder its own."""
    config = get_config(name, "tiny")
    sig = ModelSignature(config, max_items=100)
    batch = query(config, 7)
    args = fast_args(wire(batch, config))
    given: dict[str, np.ndarray] = {}
    asked: list[tuple[int, ...]] = []

    def staging(b: int, nd: int, n: int, no: int):  # type: ignore[no-untyped-def]
        asked.append((b, nd, n, no))
        given.update(dense=np.full((b, nd), np.nan, np.float32), values=np.full(n, -9),
                     offsets=np.full(no, -9))  # fmt: skip
        return given["dense"], given["values"], given["offsets"]

    staged = sig.fast_batch(*args, out=staging)
    assert staged is not None
    same(staged, batch)
    b, n = 7, batch.sparse.values.numel()
    assert asked == [(b, config.num_dense, n, len(config.feature_keys) * b + 1)]
    assert np.shares_memory(staged.sparse.values.numpy(), given["values"])
    assert np.shares_memory(staged.sparse.offsets.numpy(), given["offsets"])
    if config.num_dense:
        assert np.shares_memory(staged.dense.numpy(), given["dense"])
    same(sig.fast_batch(*args, out=lambda *_: None), batch)  # no room: its own arrays


def _with(
    tensors: dict[str, WireTensor], name: str, data: np.ndarray, shape=None
) -> dict[str, WireTensor]:  # type: ignore[no-untyped-def]
    out = dict(tensors)
    old = tensors[name]
    out[name] = WireTensor(name, old.datatype, tuple(data.shape) if shape is None else shape, data)
    return out


def test_fast_path_leaves_every_irregular_request_to_the_named_errors() -> None:
    config = get_config("wnd", "tiny")
    sig = ModelSignature(config, max_items=8)
    tensors = wire(query(config, 4), config)
    key = config.feature_keys[0]
    offsets = tensors[f"{key}.offsets"].data
    dense = tensors["dense"].data.reshape(4, -1)
    lengths = dict(tensors)
    del lengths[f"{key}.offsets"]
    lengths[f"{key}.lengths"] = WireTensor(f"{key}.lengths", "INT64", (4,), np.diff(offsets))
    cases = {
        "must start at 0": _with(tensors, f"{key}.offsets", offsets + 1),
        "ends at": _with(tensors, f"{key}.offsets", np.append(offsets[:-1], offsets[-1] + 1)),
        r"expected B \+ 1": _with(tensors, f"{key}.offsets", offsets[:-1]),
        "expected shape": _with(tensors, "dense", dense[:, :-1]),
        "over the limit": wire(query(config, 9), config),
        "missing input": {k: v for k, v in tensors.items() if k != f"{key}.values"},
        "is given twice": None,
        "lengths": lengths,
    }
    for words, case in cases.items():
        if case is None:  # the same input twice
            args = fast_args(tensors, [*list(tensors)[:-1], next(iter(tensors))])
            assert sig.fast_batch(*args) is None
            continue
        assert sig.fast_batch(*fast_args(case)) is None, words
        if words == "expected shape":  # a header check, made as the body is read
            with pytest.raises(InvalidArgument, match=words):
                sig.check_input("dense", "FP32", list(case["dense"].shape))
        elif words != "lengths":
            with pytest.raises(InvalidArgument, match=words):
                sig.to_batch(case)
    same(sig.to_batch(lengths), sig.fast_batch(*fast_args(tensors)))  # type: ignore[arg-type]
    # a bool where an int belongs, a short byte string: not the common layout either
    names, datatypes, shapes, buffers = fast_args(tensors)
    shapes[0] = [4, True] if names[0] == "dense" else [True]
    assert sig.fast_batch(names, datatypes, shapes, buffers) is None
    names, datatypes, shapes, buffers = fast_args(tensors)
    buffers[-1] = buffers[-1][:-8]
    assert sig.fast_batch(names, datatypes, shapes, buffers) is None


def test_fast_path_validates_like_the_model() -> None:
    config = get_config("wnd", "tiny")
    sig = ModelSignature(config, max_items=8)
    tensors = wire(query(config, 4, jitter=False), config)
    key = config.feature_keys[1]
    values = tensors[f"{key}.values"].data.copy()
    values[-1] = config.table(key).num_rows
    with pytest.raises(InvalidArgument, match=f"feature '{key}': id {values[-1]} out of range"):
        sig.fast_batch(*fast_args(_with(tensors, f"{key}.values", values)))
    dense = tensors["dense"].data.copy()
    dense[5] = np.nan
    with pytest.raises(InvalidArgument, match="non-finite"):
        sig.fast_batch(*fast_args(_with(tensors, "dense", dense, tensors["dense"].shape)))


@pytest.mark.parametrize("name", ["wnd", "din", "dlrm-rmc2"])
@pytest.mark.parametrize("items", [1, 7])
def test_client_tensors_are_each_features_ids_and_offsets_from_zero(name: str, items: int) -> None:
    """What the clients send: per feature, its ids and its bag offsets rebased to start at 0."""
    from recserve.loadgen.synthetic import QueryFactory
    from recserve.models import build_model
    from recserve.server.client import batch_tensors

    config = build_model(name, "tiny", seed=0).config
    batch = QueryFactory(config, seed=items).make(items)
    sent = {n: (dt, shape, np.frombuffer(bytes(data), dtype="<f4" if dt == "FP32" else "<i8"))
            for n, dt, shape, data in batch_tensors(batch, config)}  # fmt: skip
    offsets = batch.sparse.offsets.numpy()
    values = batch.sparse.values.numpy()
    for f, key in enumerate(config.feature_keys):
        own = offsets[f * items : (f + 1) * items + 1]
        dt, shape, got = sent[f"{key}.offsets"]
        assert dt == "INT64" and shape == [items + 1]
        assert got.tolist() == (own - own[0]).tolist()
        dt, shape, got = sent[f"{key}.values"]
        assert shape == [int(own[-1] - own[0])]
        assert got.tolist() == values[own[0] : own[-1]].tolist()
