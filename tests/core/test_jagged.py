"""KeyedJagged layout operations."""

from __future__ import annotations

import pytest
import torch

from recserve.types import KeyedJagged


def _kjt() -> KeyedJagged:
    # two features, batch 3: a = [[1], [], [2, 3]], b = [[4, 5], [6], []]
    return KeyedJagged.from_lengths(
        ["a", "b"], torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([1, 0, 2, 2, 1, 0])
    )


def test_from_lengths_offsets() -> None:
    kjt = _kjt()
    assert kjt.offsets.tolist() == [0, 1, 1, 3, 5, 6, 6]
    assert kjt.batch_size == 3
    assert kjt.key_offsets() == [0, 3, 6]


def test_feature_and_select() -> None:
    kjt = _kjt()
    v, o = kjt.feature("b")
    assert v.tolist() == [4, 5, 6] and o.tolist() == [0, 2, 3, 3]
    swapped = kjt.select(["b", "a"])
    assert swapped.values.tolist() == [4, 5, 6, 1, 2, 3]
    assert swapped.offsets.tolist() == [0, 2, 3, 3, 4, 4, 6]


def test_slice_items() -> None:
    part = _kjt().slice_items(1, 3)
    assert part.batch_size == 2
    assert part.values.tolist() == [2, 3, 6]
    assert part.offsets.tolist() == [0, 0, 2, 3, 3]


def test_from_dict_round_trip() -> None:
    kjt = _kjt()
    again = KeyedJagged.from_dict({k: kjt.feature(k) for k in kjt.keys}, 3)
    assert torch.equal(again.values, kjt.values) and torch.equal(again.offsets, kjt.offsets)


def test_from_dict_rejects_wrong_offsets() -> None:
    with pytest.raises(ValueError, match="feature 'a': offsets must have batch_size"):
        KeyedJagged.from_dict({"a": (torch.tensor([1]), torch.tensor([0, 1]))}, 3)


def test_negative_lengths_rejected() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        KeyedJagged.from_lengths(["a"], torch.tensor([1]), torch.tensor([2, -1]))
