"""Criteo reader: the real sample, preprocessing golden cases, and bad files."""

from __future__ import annotations

import dataclasses
import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from recserve.data import CriteoReader, DataFileError, criteo_dlrm_config, fnv1a64
from recserve.types import validate_batch

CRITEO = "criteo_dac_head8k"


def _line(label: str = "1", ints: list[str] | None = None, cats: list[str] | None = None) -> str:
    ints = ints if ints is not None else [str(i) for i in range(13)]
    cats = cats if cats is not None else ["68fd1e64"] * 26
    return "\t".join([label, *ints, *cats]) + "\n"


def _write(tmp_path: Path, text: str, name: str = "d.tsv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("split", "rows", "clicks"), [("train", 7200, 1549), ("dev", 409, 93), ("test", 391, 86)]
)
def test_real_sample_splits(shared_data: Path, split: str, rows: int, clicks: int) -> None:
    config = criteo_dlrm_config(rows_per_table=1000, dim=4)
    reader = CriteoReader(shared_data / CRITEO / f"{split}.tsv", config, batch_size=1000)
    sizes, positives = [], 0.0
    for lb in reader:
        validate_batch(lb.batch, config)
        assert lb.batch.sparse.keys == config.feature_keys
        assert bool((lb.batch.sparse.lengths == 1).all())
        assert lb.batch.dense.min() >= 0  # log(1 + max(x, 0))
        sizes.append(lb.batch_size)
        positives += float(lb.labels.sum())
    assert sum(sizes) == rows and positives == clicks
    assert all(s == 1000 for s in sizes[:-1])


def test_first_line_of_train_preprocessed(shared_data: Path) -> None:
    # 0  1 1 5 0 1382 4 15 2 181 1 2 '' 2  68fd1e64 80e26c9b ...
    config = criteo_dlrm_config(rows_per_table=1000)
    lb = next(iter(CriteoReader(shared_data / CRITEO / "train.tsv", config, batch_size=4)))
    counts = [1, 1, 5, 0, 1382, 4, 15, 2, 181, 1, 2, 0, 2]
    assert torch.allclose(lb.batch.dense[0], torch.tensor([math.log1p(c) for c in counts]))
    ids, _ = lb.batch.sparse.feature("C1")
    assert int(ids[0]) == 0x68FD1E64 % 1000
    assert lb.labels[:4].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_preprocessing_golden(tmp_path: Path) -> None:
    ints = ["-1", "", "0", "3", "10", "1000000", "", "", "", "", "", "", "7"]
    cats = ["", "0000000a", "FFFFFFFF", *["1"] * 23]
    path = _write(tmp_path, _line("0", ints, cats))
    rows = [7, 11, 13, *[5] * 23]
    lb = next(iter(CriteoReader(path, criteo_dlrm_config(rows_per_table=rows))))
    expected = [0, 0, 0, math.log(4), math.log(11), math.log(1000001), *[0] * 6, math.log(8)]
    assert torch.allclose(lb.batch.dense[0], torch.tensor(expected, dtype=torch.float32))
    ids = lb.batch.sparse.values.tolist()
    assert ids[:3] == [0, 10 % 11, 0xFFFFFFFF % 13] and ids[3] == 1
    fnv = next(iter(CriteoReader(path, criteo_dlrm_config(rows_per_table=rows), hash="fnv")))
    hashed = fnv1a64(cats)
    assert fnv.batch.sparse.values.tolist() == [
        int(h) % r for h, r in zip(hashed, rows, strict=True)
    ]


def test_fnv1a64_reference_vectors() -> None:
    # Published FNV-1a 64-bit test vectors.
    assert [int(h) for h in fnv1a64(["", "a", "foobar"])] == [
        0xCBF29CE484222325,
        0xAF63DC4C8601EC8C,
        0x85944171F73967E8,
    ]
    assert fnv1a64(np.array([["ab", "b"]])).shape == (1, 2)


def test_deepctr_csv_with_header(shared_data: Path) -> None:
    path = shared_data / "criteo_deepctr_sample" / "criteo_sample.txt"
    batches = list(CriteoReader(path, batch_size=64))
    assert sum(b.batch_size for b in batches) == 200
    assert sum(float(b.labels.sum()) for b in batches) == 49
    assert batches[0].batch.dense[0, 2] == pytest.approx(math.log(261.0))  # I3 = 260.0


def test_gzip_and_streaming_batches(tmp_path: Path) -> None:
    path = tmp_path / "d.tsv.gz"
    with gzip.open(path, "wt") as f:
        f.write("".join(_line(str(i % 2)) for i in range(10)))
    sizes = [lb.batch_size for lb in CriteoReader(path, batch_size=4)]
    assert sizes == [4, 4, 2]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_line() + "1\t2\t3\n", "line 2: expected 40 columns, found 3"),
        (
            _line() + _line(ints=["x", *["1"] * 12]),
            "line 2: column 'I1': expected a number, found 'x'",
        ),
        (_line(ints=[*["1"] * 12, "nan"]), "line 1: column 'I13': expected a number"),
        (_line(cats=["zz", *["1"] * 25]), "line 1: column 'C1': expected hexadecimal, found 'zz'"),
        (_line(label="2"), "line 1: label must be 0 or 1"),
        (_line(label=""), "line 1: column 'label': expected a number"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(DataFileError, match=message) as err:
        list(CriteoReader(path, header=False))
    assert str(path) in str(err.value)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="cannot open"):
        list(CriteoReader(tmp_path / "missing.tsv"))
    with pytest.raises(DataFileError, match="cannot open"):
        list(CriteoReader(tmp_path))
    path = tmp_path / "latin1.tsv"
    path.write_bytes(_line().encode() + b"\xff\xfe\n")
    with pytest.raises(DataFileError, match="line 2: not UTF-8"):
        list(CriteoReader(path, header=False))
    assert isinstance(DataFileError("f", "m"), ValueError)


def test_config_must_fit() -> None:
    with pytest.raises(ValueError, match="13 dense features and 26 pooled tables"):
        CriteoReader("x.tsv", dataclasses.replace(criteo_dlrm_config(), num_dense=12))
