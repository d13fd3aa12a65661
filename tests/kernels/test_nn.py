"""The drop-in modules against torch.nn.EmbeddingBag."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recserve.config import TableConfig
from recserve.nn import EmbeddingBag, EmbeddingBagCollection, replace_embedding_bags
from recserve.types import KeyedJagged

pytestmark = pytest.mark.interpreter


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_inputs(mode: str, gen: torch.Generator) -> None:
    ref = nn.EmbeddingBag(40, 12, mode=mode)
    ours = EmbeddingBag.from_torch(ref)
    x2d = torch.randint(0, 40, (5, 3), generator=gen)
    torch.testing.assert_close(ours(x2d), ref(x2d))
    values = torch.randint(0, 40, (9,), generator=gen)
    offsets = torch.tensor([0, 2, 2, 7])
    torch.testing.assert_close(ours(values, offsets), ref(values, offsets))
    if mode == "sum":
        psw = torch.rand(9, generator=gen)
        torch.testing.assert_close(
            ours(values, offsets, psw), ref(values, offsets, per_sample_weights=psw)
        )


def test_include_last_offset_and_fp16_rows(gen: torch.Generator) -> None:
    weight = torch.randn(30, 8, generator=gen)
    ref = nn.EmbeddingBag.from_pretrained(weight, mode="sum", include_last_offset=True)
    ours = EmbeddingBag.from_pretrained(weight, mode="sum", include_last_offset=True, dtype="fp16")
    values = torch.randint(0, 30, (10,), generator=gen)
    offsets = torch.tensor([0, 4, 4, 10])
    torch.testing.assert_close(ours(values, offsets), ref(values, offsets), rtol=2e-3, atol=2e-3)
    assert ours.weight.shape == (30, 8)


def test_unsupported_arguments() -> None:
    with pytest.raises(ValueError):
        EmbeddingBag(10, 4, mode="max")
    with pytest.raises(ValueError):
        EmbeddingBag(10, 4, padding_idx=0)
    with pytest.raises(ValueError):
        EmbeddingBag(10, 4)(torch.zeros(3, dtype=torch.int64))


def test_replace_embedding_bags(gen: torch.Generator) -> None:
    model = nn.Sequential(
        nn.ModuleList([nn.EmbeddingBag(10, 4, mode="sum"), nn.EmbeddingBag(20, 8)]), nn.Linear(4, 4)
    )
    x = torch.randint(0, 10, (3, 2), generator=gen)
    expected = [m(x) for m in model[0]]
    assert replace_embedding_bags(model) == 2
    assert all(isinstance(m, EmbeddingBag) for m in model[0])
    for m, e in zip(model[0], expected, strict=True):
        torch.testing.assert_close(m(x), e)


def test_collection_one_launch_for_all_tables(gen: torch.Generator) -> None:
    bags = nn.ModuleDict(
        {"u": nn.EmbeddingBag(25, 16, mode="sum"), "v": nn.EmbeddingBag(15, 8, mode="mean")}
    )
    col = EmbeddingBagCollection.from_torch(bags)
    lengths = torch.randint(0, 4, (2 * 5,), generator=gen)
    values = torch.cat(
        [
            torch.randint(0, (25, 15)[i // 5], (int(n),), generator=gen)
            for i, n in enumerate(lengths)
        ]
    )
    kj = KeyedJagged.from_lengths(["u", "v"], values, lengths)
    out = col(kj)
    parts = col.split(out)
    for name, bag in bags.items():
        v, o = kj.feature(name)
        torch.testing.assert_close(parts[name], bag(v, o[:-1]))
    assert EmbeddingBagCollection([TableConfig("w", 5, 4)], "cpu").keys == ("w",)
