"""Avazu reader: the real sample (header only in train.csv), time features, bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recserve.data import AvazuReader, DataFileError, avazu_dlrm_config, fnv1a64
from recserve.data.avazu import CATEGORICAL_NAMES
from recserve.types import validate_batch

ROW = (
    "10000169349117863715,0,14102100,1005,0,1fbe01fe,f3845767,28905ebd,ecad2386,7801e8d9,"
    "07d7df22,a99f214a,96809ac8,711ee120,1,0,15704,320,50,1722,0,35,100084,79"
)


@pytest.mark.parametrize(
    ("split", "rows", "clicks"), [("train", 8087, 1397), ("dev", 480, 86), ("test", 432, 80)]
)
def test_real_sample_splits(shared_data: Path, split: str, rows: int, clicks: int) -> None:
    config = avazu_dlrm_config(rows_per_table=500, dim=4)
    total, positives = 0, 0.0
    for lb in AvazuReader(shared_data / "avazu_head9k" / f"{split}.csv", config, batch_size=2048):
        validate_batch(lb.batch, config)
        total += lb.batch_size
        positives += float(lb.labels.sum())
    assert (total, positives) == (rows, clicks)


def test_first_row_preprocessed(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("id,click,hour," + ",".join(CATEGORICAL_NAMES) + "\n" + ROW + "\n")
    config = avazu_dlrm_config(rows_per_table=1000)
    lb = next(iter(AvazuReader(path, config)))
    # 2014-10-21 00h is a Tuesday: hour 0, weekday 1 / 6, not a weekend.
    assert torch.allclose(lb.batch.dense[0], torch.tensor([0.0, 1 / 6, 0.0]))
    ids, _ = lb.batch.sparse.feature("site_id")
    assert int(ids[0]) == int(fnv1a64(["1fbe01fe"])[0]) % 1000
    assert lb.batch.sparse.keys == CATEGORICAL_NAMES and lb.labels.tolist() == [0.0]


def test_weekend_hour(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text(ROW.replace(",14102100,", ",14102523,") + "\n")  # Saturday 23h
    lb = next(iter(AvazuReader(path)))
    assert torch.allclose(lb.batch.dense[0], torch.tensor([1.0, 5 / 6, 1.0]))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (ROW.replace(",14102100,", ",141021,"), "line 1: column 'hour': expected YYMMDDHH"),
        (ROW.replace(",14102100,", ",14133100,"), "line 1: column 'hour': expected YYMMDDHH"),
        (
            ROW.replace("715,0,", "715,yes,"),
            "line 1: column 'click': expected a number, found 'yes'",
        ),
        (ROW + ",extra", "line 1: expected 24 columns, found 25"),
    ],
)
def test_bad_rows(tmp_path: Path, row: str, message: str) -> None:
    path = tmp_path / "a.csv"
    path.write_text(row + "\n")
    with pytest.raises(DataFileError, match=message):
        list(AvazuReader(path))
