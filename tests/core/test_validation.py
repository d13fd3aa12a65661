"""Bad input gives a clear ValueError naming the table or field, never a crash in torch."""

from __future__ import annotations

import pytest
import torch

from recserve.loadgen.synthetic import QueryFactory
from recserve.models import get_config
from recserve.types import Batch, KeyedJagged, validate_batch

CFG = get_config("dlrm-rmc1", "tiny")
DIN = get_config("din", "tiny")


def _batch(cfg=CFG, b: int = 4) -> Batch:
    return QueryFactory(cfg, "uniform", seed=0).make(b)


def test_valid_batch_passes() -> None:
    validate_batch(_batch(), CFG)
    validate_batch(_batch(DIN), DIN)


def test_id_out_of_range_names_the_table() -> None:
    batch = _batch()
    batch.sparse.values[batch.sparse.key_offsets()[2]] = CFG.tables[2].num_rows
    with pytest.raises(ValueError, match=r"feature 't2': id 97 out of range for 97 rows"):
        validate_batch(batch, CFG)


def test_negative_id() -> None:
    batch = _batch()
    batch.sparse.values[-1] = -3
    with pytest.raises(ValueError, match=r"feature 't3': negative id -3"):
        validate_batch(batch, CFG)


def test_sequence_id_checked_against_its_table() -> None:
    batch = _batch(DIN)
    batch.sparse.values[-1] = DIN.table("behaviour").num_rows
    with pytest.raises(ValueError, match="feature 'history': id"):
        validate_batch(batch, DIN)


def test_decreasing_offsets() -> None:
    batch = _batch()
    off = batch.sparse.offsets
    off[5] = off[4] - 1
    with pytest.raises(ValueError, match="feature .t1.: offsets decrease at item 0"):
        validate_batch(batch, CFG)


def test_offsets_must_end_at_len_values() -> None:
    batch = _batch()
    batch.sparse.values = batch.sparse.values[:-1]
    with pytest.raises(ValueError, match="must end at len\\(values\\)"):
        validate_batch(batch, CFG)


def test_offsets_must_start_at_zero() -> None:
    batch = _batch()
    batch.sparse.offsets[0] = 1
    with pytest.raises(ValueError, match="must start at 0"):
        validate_batch(batch, CFG)


def test_wrong_offsets_count() -> None:
    batch = _batch()
    batch.sparse.offsets = batch.sparse.offsets[:-2]
    with pytest.raises(ValueError, match="offsets: expected"):
        validate_batch(batch, CFG)


def test_wrong_dense_width() -> None:
    batch = _batch()
    batch.dense = torch.zeros(4, CFG.num_dense + 1)
    with pytest.raises(ValueError, match=r"dense: expected shape \[4, 16\]"):
        validate_batch(batch, CFG)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_dense(bad: float) -> None:
    batch = _batch()
    batch.dense[2, 5] = bad
    with pytest.raises(ValueError, match="dense: non-finite value .* at item 2, column 5"):
        validate_batch(batch, CFG)


def test_dense_dtype() -> None:
    batch = _batch()
    batch.dense = batch.dense.double()
    with pytest.raises(ValueError, match="dense: expected float32"):
        validate_batch(batch, CFG)


def test_empty_batch() -> None:
    keys = CFG.feature_keys
    sparse = KeyedJagged.from_lengths(
        keys, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    )
    with pytest.raises(ValueError, match="empty batch"):
        validate_batch(Batch(torch.zeros(0, CFG.num_dense), sparse), CFG)


def test_missing_and_extra_features() -> None:
    batch = _batch()
    s = batch.sparse
    batch.sparse = KeyedJagged((*s.keys[:-1], "bogus"), s.values, s.offsets, s.batch_size)
    with pytest.raises(ValueError, match=r"missing \['t3'\], unexpected \['bogus'\]"):
        validate_batch(batch, CFG)


def test_wrong_values_dtype() -> None:
    batch = _batch()
    batch.sparse.values = batch.sparse.values.to(torch.int32)
    with pytest.raises(ValueError, match="expected 1-D int64"):
        validate_batch(batch, CFG)


def test_sequence_over_max_len() -> None:
    batch = _batch(DIN, b=2)
    feats = {k: batch.sparse.feature(k) for k in batch.sparse.keys}
    n = DIN.sequences[0].max_len + 1
    feats["history"] = (torch.zeros(n, dtype=torch.int64), torch.tensor([0, n, n]))
    batch.sparse = KeyedJagged.from_dict(feats, 2)
    with pytest.raises(ValueError, match="sequence 'history': length 6 is over its max_len 5"):
        validate_batch(batch, DIN)


def test_batch_over_item_limit() -> None:
    with pytest.raises(ValueError, match="over the limit of 3"):
        validate_batch(_batch(), CFG, max_items=3)


def test_last_id_checked_when_trailing_features_are_empty() -> None:
    """The largest id of a feature followed by empty features is still range-checked."""
    lengths = torch.tensor([1, 2, 0, 0, 0, 0, 0, 0])  # t0 has ids, t1..t3 are empty
    values = torch.tensor([1, 2, CFG.tables[0].num_rows])
    sparse = KeyedJagged.from_lengths(CFG.feature_keys, values, lengths)
    with pytest.raises(ValueError, match="feature 't0': id 97 out of range"):
        validate_batch(Batch(torch.zeros(2, CFG.num_dense), sparse), CFG)
