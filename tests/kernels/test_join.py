"""The device-side join of queries (kernels/join.py) against its plain-torch reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernel_inputs import jagged

from recserve.engine.batching import concat_batches
from recserve.kernels import join
from recserve.types import Batch, KeyedJagged

KEYS = ("a", "b", "c")


def _query(b: int, nd: int, max_len: int, gen: torch.Generator) -> Batch:
    values, offsets = jagged([50, 7, 1000], b, max_len, gen)
    dense = torch.randn(b, nd, generator=gen)
    return Batch(dense, KeyedJagged(KEYS, values, offsets, b))


def _in_one_buffer(parts: list[Batch], gen: torch.Generator) -> tuple[torch.Tensor, list[Batch]]:
    """The queries copied into one byte buffer at random element-aligned places (as a shared
    region holds them), in a shuffled order."""
    sizes = [
        (p.dense.numel() * 4, p.sparse.values.numel() * 8, p.sparse.offsets.numel() * 8)
        for p in parts
    ]
    total = sum(sum(s) + 3 * 64 for s in sizes)
    buf = torch.zeros(total, dtype=torch.uint8)
    at, out = 0, []
    order = torch.randperm(len(parts), generator=gen).tolist()
    placed: dict[int, Batch] = {}
    for q in order:
        p = parts[q]
        views = []
        for t, nbytes, align in zip(
            (p.dense, p.sparse.values, p.sparse.offsets), sizes[q], (4, 8, 8), strict=True
        ):
            at = -(-at // align) * align  # element-aligned, at a random distance
            at += int(torch.randint(0, 8, (1,), generator=gen)) * align
            v = buf[at : at + nbytes].view(t.dtype).view(t.shape)
            v.copy_(t)
            views.append(v)
            at += nbytes
        placed[q] = Batch(views[0], KeyedJagged(KEYS, views[1], views[2], p.batch_size))
    out = [placed[q] for q in range(len(parts))]
    return buf, out


@pytest.mark.interpreter
@pytest.mark.parametrize("shared", [True, False], ids=["one-region", "separate"])
@pytest.mark.parametrize("sizes", [[5], [3, 1, 7], [16, 16, 2, 9]])
def test_join_matches_reference(sizes: list[int], shared: bool, gen: torch.Generator) -> None:
    nd = 6
    parts = [_query(b, nd, 5, gen) for b in sizes]
    buf = None
    if shared:
        buf, parts = _in_one_buffer(parts, gen)
    b = sum(sizes)
    size = b + int(torch.randint(0, 5, (1,), generator=gen))
    ref_offsets, ref_values, ref_dense = join.join_reference(parts, size)
    n = ref_values.numel()
    out_offsets = torch.full((len(KEYS) * size + 1,), -7, dtype=torch.int64)
    out_values = torch.full((n + 11,), -7, dtype=torch.int64)
    out_dense = torch.full((size, nd), float("nan"))
    plan = torch.from_numpy(join.join_plan(parts, size))
    join.join_queries(parts, plan, out_offsets, out_values, out_dense)
    assert torch.equal(out_offsets, ref_offsets)
    assert torch.equal(out_values[:n], ref_values)
    assert (out_values[n:] == -7).all()  # nothing written past the ids
    assert torch.equal(out_dense[:b], ref_dense)
    assert out_dense[b:].isnan().all()
    # and the reference agrees with the host join the engine uses
    host = concat_batches(parts, KEYS)
    assert torch.equal(host.sparse.values, ref_values)
    assert torch.equal(host.dense, ref_dense)
    del buf


@pytest.mark.interpreter
def test_join_splits_long_segments_into_chunks(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(join, "CHUNK", 64)
    parts = [_query(b, 3, 40, gen) for b in (9, 4)]
    plan = join.join_plan(parts, 16)
    ids = plan[plan[:, 0] == join.IDS]
    assert ids[:, 2].max() <= 64
    assert ids[:, 2].sum() == sum(p.sparse.values.numel() for p in parts)
    ref_offsets, ref_values, ref_dense = join.join_reference(parts, 16)
    out_offsets = torch.empty(3 * 16 + 1, dtype=torch.int64)
    out_values = torch.empty(ref_values.numel(), dtype=torch.int64)
    out_dense = torch.empty(16, 3)
    join.join_queries(parts, torch.from_numpy(plan), out_offsets, out_values, out_dense)
    assert torch.equal(out_offsets, ref_offsets)
    assert torch.equal(out_values, ref_values)
    assert torch.equal(out_dense[:13], ref_dense)


def test_join_plan_writes_into_a_given_table(gen: torch.Generator) -> None:
    parts = [_query(b, 2, 3, gen) for b in (2, 3)]
    room = np.full((1000, 7), -1, dtype=np.int64)
    plan = join.join_plan(parts, 8, out=room)
    assert np.shares_memory(plan, room)
    assert np.array_equal(plan, join.join_plan(parts, 8))


def test_join_refuses_what_it_cannot_lay_out(gen: torch.Generator) -> None:
    parts = [_query(b, 2, 3, gen) for b in (4, 5)]
    with pytest.raises(ValueError, match="bucket"):
        join.join_plan(parts, 8)
    other = Batch(parts[1].dense, KeyedJagged(("x", "y", "z"), *_raw(parts[1]), 5))
    with pytest.raises(ValueError, match="same features"):
        join.join_plan([parts[0], other], 16)
    misaligned = Batch(
        parts[1].dense,
        KeyedJagged(KEYS, _misaligned(parts[1].sparse.values), parts[1].sparse.offsets, 5),
    )
    with pytest.raises(ValueError, match="aligned"):
        join.join_plan([parts[0], misaligned], 16)


def _raw(p: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    return p.sparse.values, p.sparse.offsets


def _misaligned(values: torch.Tensor) -> torch.Tensor:
    """``values`` copied to an address 4 bytes off an 8-byte boundary."""
    arr = np.zeros(2 * values.numel() + 2, dtype=np.int32)[1:-1].view(np.int64)
    arr[:] = values.numpy()
    return torch.from_numpy(arr)
