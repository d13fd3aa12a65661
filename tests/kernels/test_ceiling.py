"""The random-row-read ceiling kernel against its reference."""

from __future__ import annotations

import pytest
import torch
from kernel_inputs import rel_err

from recserve.kernels.ceiling import hashed_ids, random_rows
from recserve.kernels.reference import random_rows_reference

pytestmark = pytest.mark.interpreter


@pytest.mark.parametrize("width", [12, 32])
@pytest.mark.parametrize("hashed", [False, True])
def test_random_rows(width: int, hashed: bool, gen: torch.Generator) -> None:
    table = torch.randn(64, width, generator=gen)
    ids = None if hashed else torch.randint(0, 64, (128,), generator=gen)
    out = random_rows(table, width, ids, 128, per_prog=32, rows=8, seed=5)
    used = hashed_ids(128, 64, 5) if hashed else ids
    assert rel_err(out[:, :width], random_rows_reference(table, used, 32)) < 1e-5


def test_int32_ids_read_the_same_rows(gen: torch.Generator) -> None:
    table = torch.randn(64, 32, generator=gen)
    ids = torch.randint(0, 64, (128,), generator=gen)
    wide = random_rows(table, 32, ids, 128, per_prog=32, rows=8)
    assert torch.equal(random_rows(table, 32, ids.int(), 128, per_prog=32, rows=8), wide)


def test_hashed_ids_are_spread() -> None:
    ids = hashed_ids(1 << 14, 1 << 10)
    assert ids.min() >= 0 and ids.max() < 1 << 10
    assert torch.unique(ids).numel() > 900


@pytest.mark.parametrize("hashed", [False, True])
def test_gather_writes_every_row_read(hashed: bool, gen: torch.Generator) -> None:
    table = torch.randn(64, 36, generator=gen)  # 32 of the 36 columns read
    ids = None if hashed else torch.randint(0, 64, (96,), generator=gen)
    out = random_rows(table, 32, ids, 96, per_prog=32, rows=16, seed=3, gather=True)
    used = hashed_ids(96, 64, 3) if hashed else ids
    assert torch.equal(out, table[used, :32])
    with pytest.raises(ValueError, match="multiple of 4"):
        random_rows(table, 30, ids, 96, per_prog=32, rows=16, gather=True)


def test_size_matched_ceilings_measure_each_size_asked_for() -> None:
    from recserve.kernels.bench.ceilings import launch_floor_us, size_matched_ceilings

    got = size_matched_ceilings(
        {64: {(100, False), (64, True)}}, table_bytes=1 << 16, variants=((32, 16, 4),),
        device="cpu", sets=2,
    )  # fmt: skip
    assert set(got[64]) == {"100", "64:gather"}
    plain = got[64]["100"]
    assert plain["reads"] == 128 and plain["per_prog"] == 32  # rounded up to whole programs
    assert plain["rows_per_s"] == plain["reads"] / plain["us"] * 1e6 > 0
    assert plain["hashed_ids"] is False and plain["hashed_ids_rows_per_s"] > 0  # ids read
    assert launch_floor_us("cpu") > 0
