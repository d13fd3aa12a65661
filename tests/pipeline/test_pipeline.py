"""The inference pipeline gives the model's own predictions (CPU: eager; GPU: graphs)."""

from __future__ import annotations

import pytest
import torch

from recserve.loadgen.synthetic import QueryFactory
from recserve.models import MODEL_NAMES, build_model
from recserve.pipeline import GPUPipeline, pad_offsets, triton_model
from recserve.types import Batch, KeyedJagged


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_cpu_pipeline_is_the_model(name: str) -> None:
    model = build_model(name, preset="tiny", seed=0)
    batch = QueryFactory(model.config, "uniform", seed=1).make(7)
    with torch.inference_mode():
        assert torch.equal(GPUPipeline(model)(batch), model(batch))


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_pipeline_matches_eager(name: str, backend: str) -> None:
    model = build_model(name, preset="small", seed=0, device="cuda")
    served = triton_model(model) if backend == "triton" else model
    pipe = GPUPipeline(served, buckets=(16, 64))
    assert pipe.full_graph == (backend == "triton")
    queries = QueryFactory(model.config, "zipf:1.05", seed=2)
    for size in (5, 16, 40, 100):  # inside buckets (padded), exact, and past the largest
        batches = [queries.make(size) for _ in range(4)]
        with torch.inference_mode():
            refs = [model(b.to("cuda")) for b in batches]
            # Four in a row without a sync: both graphs of the bucket and the pinned buffers
            # are reused while earlier batches may still run; every result stays intact.
            outs = [pipe(b) for b in batches]
        torch.cuda.synchronize()
        for out, ref in zip(outs, refs, strict=True):
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
    sizes = pipe.graph_sizes()
    assert sizes["full" if backend == "triton" else "dense"] == [16, 64]


@pytest.mark.gpu
def test_gpu_full_graph_grows_its_id_capacity() -> None:
    model = build_model("dlrm-rmc2", preset="small", seed=0, device="cuda")
    pipe = GPUPipeline(triton_model(model), buckets=(64,))
    few = QueryFactory(model.config, "uniform", seed=5).make(4)  # few ids: small capacity
    many = QueryFactory(model.config, "uniform", seed=6).make(64)  # more ids than that
    with torch.inference_mode():
        for batch in (few, many, few):
            torch.testing.assert_close(pipe(batch), model(batch.to("cuda")), rtol=1e-4, atol=1e-6)
    assert pipe._full[64][0].capacity >= many.sparse.values.numel()


@pytest.mark.parametrize("name", ["dlrm-rmc1", "din", "dien", "mt-wnd"])
def test_padded_offsets_give_the_same_items(name: str) -> None:
    """What a graph captured for a larger bucket sees: the batch padded with empty bags."""
    model = build_model(name, preset="tiny", seed=0)
    batch = QueryFactory(model.config, "uniform", seed=3).make(5)
    s = batch.sparse
    f = len(s.keys)
    padded_offsets = pad_offsets(s.offsets, f, 5, 8)
    assert padded_offsets.numel() == f * 8 + 1
    lengths = (padded_offsets[1:] - padded_offsets[:-1]).view(f, 8)
    assert torch.equal(lengths[:, :5], (s.offsets[1:] - s.offsets[:-1]).view(f, 5))
    assert not lengths[:, 5:].any()
    # A capacity larger than the ids, as in the static buffer (the tail is never read).
    values = torch.cat([s.values, torch.zeros(11, dtype=s.values.dtype)])
    dense = torch.cat([batch.dense, torch.randn(3, *batch.dense.shape[1:])])
    big = Batch(dense, KeyedJagged(s.keys, values, padded_offsets, 8, None, None))
    with torch.inference_mode():
        torch.testing.assert_close(model(big)[:5], model(batch), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="cannot pad"):
        pad_offsets(s.offsets, f, 5, 4)


@pytest.mark.parametrize(("batch", "size"), [(1, 1), (3, 3), (3, 7), (6, 16)])
def test_padded_offsets_match_a_plain_loop(batch: int, size: int) -> None:
    """Bag by bag, with empty bags and a feature with no ids at all."""
    g = torch.Generator().manual_seed(batch * 100 + size)
    f = 4
    lengths = torch.randint(0, 4, (f, batch), generator=g)
    lengths[1] = 0
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.reshape(-1).cumsum(0)])
    want = []
    for k in range(f):
        want += [int(offsets[k * batch + i]) for i in range(batch)]
        want += [int(offsets[(k + 1) * batch])] * (size - batch)
    want.append(int(offsets[-1]))
    assert pad_offsets(offsets, f, batch, size).tolist() == want


def test_pipeline_writes_its_answer_into_a_given_tensor() -> None:
    model = build_model("dlrm-rmc1", preset="tiny", seed=0)
    pipe = GPUPipeline(model)
    batch = QueryFactory(model.config, "uniform", seed=2).make(6)
    out = torch.full((6, 1), -1.0)
    with torch.inference_mode():
        got = pipe(batch, out=out)
        want = model(batch)
    assert got is out
    torch.testing.assert_close(out, want)


def test_mixed_precision_rows_and_autocast_stay_close() -> None:
    model = build_model("dlrm-rmc2", preset="tiny", seed=0)
    batch = QueryFactory(model.config, "zipf:1.05", seed=4).make(16)
    fp16 = triton_model(model, row_dtype="fp16")
    assert {t.dtype for t in fp16.sparse.backend.tables} == {"fp16"}
    with torch.inference_mode():
        ref = model(batch)
        rows16 = GPUPipeline(fp16)(batch)
        mixed = GPUPipeline(fp16, autocast=torch.bfloat16)(batch)
    assert rows16.dtype == mixed.dtype == torch.float32
    assert not torch.equal(rows16, ref)  # fp16 rows do change the result...
    torch.testing.assert_close(rows16, ref, rtol=1e-3, atol=1e-4)  # ...by fp16 rounding
    torch.testing.assert_close(mixed, ref, rtol=5e-2, atol=5e-3)


def test_only_graph_safe_backends_get_whole_forward_graphs() -> None:
    model = build_model("ncf", preset="tiny", seed=0)
    assert not model.sparse.backend.graph_safe  # the torch reference slices per table
    assert triton_model(model).sparse.backend.graph_safe
    assert not GPUPipeline(triton_model(model)).full_graph  # no CUDA device here


def _pinned(batch: Batch) -> Batch:
    s = batch.sparse
    sparse = KeyedJagged(s.keys, s.values.pin_memory(), s.offsets.pin_memory(), s.batch_size)
    return Batch(batch.dense.pin_memory(), sparse)


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gpu_join_on_device_matches_eager(name: str) -> None:
    """Queries in page-locked memory joined by the device-side kernel give each query's own
    answers, several joins in a row without a sync (both graphs of a bucket in turn)."""
    model = build_model(name, preset="small", seed=0, device="cuda")
    pipe = GPUPipeline(triton_model(model), buckets=(16, 64, 256))
    queries = QueryFactory(model.config, "zipf:1.05", seed=5, jitter=True)
    joins = [[3, 1, 9], [16], [40, 2, 60, 1], [100, 100, 50]]
    parts = [[_pinned(queries.make(n)) for n in sizes] for sizes in joins]
    with torch.inference_mode():
        outs = [pipe.call_joined(p) for p in parts]
        torch.cuda.synchronize()
        for ps, out in zip(parts, outs, strict=True):
            assert out is not None
            ref = torch.cat([model(p.to("cuda")) for p in ps])
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
        assert pipe.call_joined([_pinned(queries.make(200)), _pinned(queries.make(100))]) is None
