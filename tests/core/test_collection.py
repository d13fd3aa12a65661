"""EmbeddingCollection with the pure-torch backend against a loop-over-bags reference."""

from __future__ import annotations

import pytest
import torch

from recserve.config import SequenceConfig, TableConfig
from recserve.embedding import EmbeddingCollection
from recserve.types import KeyedJagged


def _reference(
    weight: torch.Tensor,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    mode: str,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    out = torch.zeros(offsets.numel() - 1, weight.shape[1], dtype=torch.float64)
    for b in range(offsets.numel() - 1):
        s, e = int(offsets[b]), int(offsets[b + 1])
        rows = weight[ids[s:e]].double()
        if weights is not None:
            rows = rows * weights[s:e, None].double()
        if e > s:
            out[b] = rows.sum(0) / ((e - s) if mode == "mean" else 1)
    return out


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "int8"])
@pytest.mark.parametrize("weighted", [False, True])
def test_pooled_matches_reference(dtype: str, weighted: bool) -> None:
    tables = (
        TableConfig("a", 50, 8, dtype=dtype),
        TableConfig("b", 30, 96, pooling="mean", dtype=dtype),
        TableConfig("c", 7, 4, dtype=dtype),
    )
    coll = EmbeddingCollection(tables)
    coll.backend.reset_parameters(torch.Generator().manual_seed(1))
    b = 6
    lengths = torch.tensor([0, 1, 3, 2, 0, 5] + [2, 0, 1, 4, 1, 1] + [1] * 6)
    ids = torch.cat(
        [
            torch.randint(0, t.num_rows, (int(lengths[i * b : (i + 1) * b].sum()),))
            for i, t in enumerate(tables)
        ]
    )
    ids[0] = 49  # the last row
    psw = torch.rand(ids.numel()) if weighted else None
    kjt = KeyedJagged.from_lengths([t.name for t in tables], ids, lengths, psw)
    out = coll(kjt).pooled
    assert out.shape == (b, 8 + 96 + 4)
    col = 0
    for name, t in zip(coll.table_names, tables, strict=True):
        v, o = kjt.feature(name)
        w = None
        if psw is not None:
            start = kjt.key_offsets()[coll.table_names.index(name)]
            w = psw[start : start + v.numel()]
        ref = _reference(coll.dense_weight(name), v, o, t.pooling, w)
        tol = {"fp32": 1e-5, "fp16": 1e-5, "bf16": 1e-5, "int8": 1e-5}[dtype]
        torch.testing.assert_close(out[:, col : col + t.dim].double(), ref, rtol=tol, atol=tol)
        col += t.dim


def test_int8_rows_close_to_float() -> None:
    from recserve.embedding import dequantize_rowwise, quantize_rowwise

    w = torch.randn(100, 16)
    q, sb = quantize_rowwise(w)
    err = (dequantize_rowwise(q, sb) - w).abs().max()
    assert err <= (w.amax(1) - w.amin(1)).max() / 255 / 2 + 1e-6


def test_sequences_are_padded_and_masked() -> None:
    tables = (TableConfig("user", 10, 4), TableConfig("item", 20, 4, pooled=False))
    coll = EmbeddingCollection(tables, (SequenceConfig("hist", "item", 3),))
    coll.backend.reset_parameters(torch.Generator().manual_seed(0))
    # user: one id per item; hist: [5, 6], [], [7, 8, 9]
    kjt = KeyedJagged.from_lengths(
        ["user", "hist"], torch.tensor([1, 2, 3, 5, 6, 7, 8, 9]), torch.tensor([1, 1, 1, 2, 0, 3])
    )
    out = coll(kjt)
    assert out.pooled.shape == (3, 4)
    rows, mask = out.sequences["hist"]
    assert rows.shape == (3, 3, 4)
    assert mask.tolist() == [[True, True, False], [False] * 3, [True] * 3]
    item = coll.dense_weight("item")
    torch.testing.assert_close(rows[0, :2], item[[5, 6]])
    torch.testing.assert_close(rows[2], item[[7, 8, 9]])
    assert torch.equal(rows[1], torch.zeros(3, 4)) and torch.equal(rows[0, 2], torch.zeros(4))
    torch.testing.assert_close(out.pooled, coll.dense_weight("user")[[1, 2, 3]])
