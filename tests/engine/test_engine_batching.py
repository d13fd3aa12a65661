"""Coalescing queries into one batch (what the GPU runner stages into pinned buffers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recserve.engine.batching import Copier, HostBuffers, concat_batches
from recserve.loadgen.synthetic import QueryFactory
from recserve.models.registry import build_model
from recserve.types import validate_batch


@pytest.mark.parametrize("name", ["dlrm-rmc1", "din", "mt-wnd"])
@pytest.mark.parametrize("buffers", [False, True, "copier"])
@pytest.mark.parametrize("sizes", [(3, 1, 17, 8), (17,)], ids=["four", "one"])
def test_coalesced_batch_answers_like_its_queries(
    name: str, buffers: bool | str, sizes: tuple[int, ...]
) -> None:
    model = build_model(name, preset="tiny", seed=1)
    factory = QueryFactory(model.config, "zipf:1.05", seed=2, jitter=True)
    batches = [factory.make(n) for n in sizes]
    keys = batches[0].sparse.keys
    out = None
    if buffers:
        n_ids = sum(b.sparse.values.numel() for b in batches)
        out = HostBuffers.allocate(40, n_ids + 5, len(keys), model.config.num_dense)
    # min_bytes 0: even these few kilobytes go through the copier's threads, cut in pieces
    copier = Copier(3, min_bytes=0) if buffers == "copier" else None
    merged = concat_batches(batches, keys, out, copier)
    if copier is not None:
        copier.close()
    validate_batch(merged, model.config)
    assert merged.sparse.offset_per_key == merged.sparse.offsets[:: merged.batch_size].tolist()
    if out is not None:
        assert merged.sparse.values.data_ptr() == out.values.data_ptr()
    with torch.inference_mode():
        expected = torch.cat([model(b) for b in batches])
        torch.testing.assert_close(model(merged), expected, rtol=1e-5, atol=1e-6)


def test_features_are_put_in_the_requested_order() -> None:
    model = build_model("dlrm-rmc1", preset="tiny", seed=1)
    batch = QueryFactory(model.config, seed=3).make(5)
    keys = batch.sparse.keys
    for count in (1, 2):
        out = HostBuffers.allocate(10, 10_000, len(keys), model.config.num_dense)
        merged = concat_batches([batch] * count, tuple(reversed(keys)), out)
        assert merged.sparse.keys == tuple(reversed(keys))
        assert torch.equal(
            merged.sparse.feature(keys[0])[0],
            torch.cat([batch.sparse.feature(keys[0])[0]] * count),
        )


def test_buffers_that_are_too_small_are_refused() -> None:
    model = build_model("ncf", preset="tiny", seed=1)
    batch = QueryFactory(model.config, seed=3).make(10)
    out = HostBuffers.allocate(8, 1000, len(batch.sparse.keys), model.config.num_dense)
    with pytest.raises(ValueError, match="does not fit"):
        concat_batches([batch], batch.sparse.keys, out)


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_copier_copies_every_array_whole(threads: int) -> None:
    rng = np.random.default_rng(threads)
    sources = [rng.integers(0, 1 << 40, n) for n in (0, 1, 7, 1000, 4099, 33)]
    sources.append(rng.standard_normal((40, 6)).astype(np.float32)[:, ::2])  # not contiguous
    sources.append(rng.standard_normal((17, 3)).astype(np.float32))
    targets = [np.zeros_like(s) for s in sources]
    copier = Copier(threads, min_bytes=0)
    try:
        copier.copy(list(zip(targets, sources, strict=True)))
    finally:
        copier.close()
    for dst, src in zip(targets, sources, strict=True):
        np.testing.assert_array_equal(dst, src)


def test_copier_spreads_bytes_evenly_and_keeps_order() -> None:
    copier = Copier(4, min_bytes=0)
    try:
        sources = [np.arange(n, dtype=np.int64) for n in (1000, 10, 3000)]
        targets = [np.empty_like(s) for s in sources]
        jobs = [(t, [s]) for t, s in zip(targets, sources, strict=True)]
        groups = copier._split(jobs, sum(s.nbytes for s in sources))
    finally:
        copier.close()
    assert len(groups) == 4
    sizes = [sum(p.nbytes for _, parts in g for p in parts) for g in groups]
    assert max(sizes) - min(sizes) <= 8 * 4  # each group leaves less than one int64 over
    for g in groups:  # each run's destination holds exactly its parts
        assert all(dst.size == sum(p.size for p in parts) for dst, parts in g)
    flat = [p for g in groups for _, parts in g for p in parts]
    np.testing.assert_array_equal(np.concatenate(flat), np.concatenate(sources))


def test_copier_refuses_no_threads() -> None:
    with pytest.raises(ValueError, match="threads"):
        Copier(0)


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_copier_joins_many_parts_into_each_destination(threads: int) -> None:
    rng = np.random.default_rng(threads)
    ids = [rng.integers(0, 1 << 40, int(n)) for n in rng.integers(0, 300, 60)]
    dense = [rng.standard_normal((int(n), 6)).astype(np.float32) for n in (5, 0, 9, 3)]
    dense[2] = np.ascontiguousarray(np.repeat(dense[2], 2, axis=1))[:, ::2]  # not contiguous
    ids_out = np.full(sum(len(p) for p in ids) + 7, -1, dtype=np.int64)
    dense_out = np.full((30, 6), np.nan, dtype=np.float32)
    copier = Copier(threads, min_bytes=0)
    try:
        copier.join([(dense_out, dense), (ids_out, ids)])
    finally:
        copier.close()
    np.testing.assert_array_equal(ids_out[:-7], np.concatenate(ids))
    assert (ids_out[-7:] == -1).all()  # nothing written past the join
    np.testing.assert_array_equal(dense_out[:17], np.concatenate(dense))
    assert np.isnan(dense_out[17:]).all()
