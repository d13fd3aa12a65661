"""MovieLens readers: ratings, implicit feedback with negatives, NCF's evaluation files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recserve.data import DataFileError, MovieLensReader, NcfEvalReader, hit_ratio_ndcg, ncf_config
from recserve.models import build_model
from recserve.types import validate_batch

ML100K = ncf_config(943, 1682, dim=4, mlp=(8, 4))
ML1M = ncf_config(6040, 3706, dim=4, mlp=(8, 4))


def test_ratings(shared_data: Path) -> None:
    reader = MovieLensReader(
        shared_data / "movielens_100k" / "u.data", ML100K, 25_000, target="rating"
    )
    batches = list(reader)
    assert [b.batch_size for b in batches] == [25_000] * 4
    first = batches[0]
    validate_batch(first.batch, ML100K)
    # First line: 196  242  3  881250949 (1-based ids).
    assert [int(first.batch.sparse.feature(k)[0][0]) for k in ML100K.feature_keys] == [
        195,
        241,
        195,
        241,
    ]
    assert first.labels[0] == 3.0
    assert sum(float(b.labels.sum()) for b in batches) == pytest.approx(352_986)


def test_implicit_feedback_with_negatives(tmp_path: Path) -> None:
    path = tmp_path / "u.data"
    path.write_text("1\t1\t5\t1\n1\t2\t4\t2\n2\t3\t3\t3\n")
    config = ncf_config(2, 5, dim=2, mlp=(4, 2))
    reader = MovieLensReader(path, config, batch_size=4, num_negatives=3, seed=1)
    batches = list(reader)
    assert [b.batch_size for b in batches] == [4, 4, 4]
    users = torch.cat([b.batch.sparse.feature("mf_user")[0] for b in batches])
    items = torch.cat([b.batch.sparse.feature("mf_item")[0] for b in batches])
    labels = torch.cat([b.labels for b in batches])
    assert labels.tolist() == [1, 0, 0, 0] * 3
    rated = {(0, 0), (0, 1), (1, 2)}
    for u, i, y in zip(users.tolist(), items.tolist(), labels.tolist(), strict=True):
        assert ((u, i) in rated) == (y == 1)
    again = torch.cat([b.batch.sparse.values for b in reader])
    assert torch.equal(again, torch.cat([b.batch.sparse.values for b in batches]))


def test_real_implicit_counts(shared_data: Path) -> None:
    reader = MovieLensReader(
        shared_data / "movielens_100k" / "u.data", ML100K, 50_000, num_negatives=1
    )
    labels = torch.cat([b.labels for b in reader])
    assert labels.numel() == 200_000 and float(labels.sum()) == 100_000


def test_id_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "u.data"
    path.write_text("1\t1\t5\t1\n944\t1\t5\t1\n")
    with pytest.raises(DataFileError, match="line 2: user id 944 is outside the model's 943 users"):
        list(MovieLensReader(path, ML100K))


def test_ncf_eval_files(shared_data: Path) -> None:
    folder = shared_data / "ncf_ml1m_eval"
    reader = NcfEvalReader(folder / "ml-1m.test.rating", folder / "ml-1m.test.negative", ML1M, 2000)
    batches = list(reader)
    assert [b.batch_size for b in batches] == [200_000, 200_000, 200_000, 4_000]
    first = batches[0]
    validate_batch(first.batch, ML1M)
    items, _ = first.batch.sparse.feature("mf_item")
    assert items[:3].tolist() == [25, 1064, 174]  # (0,25) then its first negatives
    assert first.labels.view(-1, 100)[:, 0].eq(1).all() and first.labels.sum() == 2000
    model = build_model(ML1M, seed=0)
    with torch.no_grad():
        scores = torch.cat([model(b.batch).view(-1, 100) for b in batches])
    hr, ndcg = hit_ratio_ndcg(scores)
    assert 0.05 < hr < 0.2 and 0 < ndcg < hr  # an untrained model: about 10 in 100


def test_ncf_eval_misaligned(tmp_path: Path) -> None:
    (tmp_path / "r").write_text("0\t5\t4\t1\n1\t6\t4\t1\n")
    (tmp_path / "n").write_text("(0,5)\t1\t2\n(1,7)\t3\t4\n")
    with pytest.raises(DataFileError, match=r"n, line 2: expected '\(1,6\)'"):
        list(NcfEvalReader(tmp_path / "r", tmp_path / "n", ncf_config(2, 8, dim=2, mlp=(4, 2))))


def test_hit_ratio_ndcg_golden() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.2], [0.1, 0.5, 0.9], [0.5, 0.9, 0.1]])
    hr, ndcg = hit_ratio_ndcg(scores, k=2)
    # ranks 0, 2, 1 → hits at 0 and 1; NDCG 1 and 1/log2(3).
    assert hr == pytest.approx(2 / 3)
    assert ndcg == pytest.approx((1 + 1 / torch.log2(torch.tensor(3.0)).item()) / 3)
