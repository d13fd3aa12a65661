"""recserve train: metrics, the rare-row map, a short fit on the Criteo sample, the CLI."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from recserve.cli.main import main
from recserve.data import criteo_dlrm_config, make_batch
from recserve.models import load_model
from recserve.train import (
    LogisticRegression,
    RareRows,
    Tabular,
    TrainOptions,
    cross_validate,
    log_loss,
    predict,
    roc_auc,
    split_readers,
    train_dlrm,
)

CRITEO = "criteo_dac_head8k"


def test_roc_auc_matches_pair_counting() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (60,), generator=gen).float()
    scores = torch.randint(0, 8, (60,), generator=gen).float()  # many ties
    pos = [s for s, y in zip(scores.tolist(), labels.tolist(), strict=True) if y == 1]
    neg = [s for s, y in zip(scores.tolist(), labels.tolist(), strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    assert roc_auc(labels, scores) == pytest.approx(wins / (len(pos) * len(neg)))
    assert roc_auc(torch.ones(3), torch.rand(3)) == 0.5


def test_log_loss_golden() -> None:
    labels = torch.tensor([1.0, 0.0])
    assert log_loss(labels, torch.tensor([0.8, 0.4])) == pytest.approx(
        -(torch.log(torch.tensor(0.8)) + torch.log(torch.tensor(0.6))).item() / 2
    )
    assert log_loss(labels, torch.tensor([0.0, 1.0])) == pytest.approx(
        -torch.log(torch.tensor(1e-7)).item(), rel=1e-4
    )


def test_rare_rows_fold_gives_raw_ids_the_trained_rows() -> None:
    ids = torch.tensor([[0, 1], [0, 1], [0, 2], [3, 1]])
    rare = RareRows.fit(ids, [5, 3], min_count=2)
    # Table 0: row 0 seen 3 times; rows 1, 2, 4 unseen, row 3 once → all share row 1 (least used).
    assert rare.maps[0].tolist() == [0, 1, 1, 1, 1] and rare.shared[0] == 1
    # Table 1: rows 0 (unseen) and 2 (once) share row 0; row 1 is frequent.
    assert rare.maps[1].tolist() == [0, 1, 0] and rare.shared[1] == 0
    tables = [torch.randn(5, 2), torch.randn(3, 2)]
    mapped = [t[m] for t, m in zip(tables, rare.maps, strict=True)]
    rare.fold_into(tables)
    for t, expected in zip(tables, mapped, strict=True):
        assert torch.equal(t, expected)


def test_logistic_regression_forward() -> None:
    config = criteo_dlrm_config(rows_per_table=5, dim=2)
    lr = LogisticRegression(config)
    with torch.no_grad():
        lr.tables[3][4] = 2.0
        lr.bias.fill_(-1.0)
        lr.linear.weight.zero_()  # type: ignore[union-attr]
        lr.linear.bias.zero_()  # type: ignore[union-attr]
    ids = torch.zeros(2, 26, dtype=torch.int64)
    ids[1, 3] = 4
    probs = lr(make_batch(torch.zeros(2, 13), ids, config.feature_keys))
    assert torch.allclose(probs[:, 0], torch.sigmoid(torch.tensor([-1.0, 1.0])))


def test_short_fit_on_criteo_sample(shared_data: Path, tmp_path: Path) -> None:
    config = criteo_dlrm_config(rows_per_table=1024, dim=8, interaction="cat")
    readers = split_readers("criteo", config, shared_data / CRITEO)
    options = TrainOptions(epochs=4, patience=4)
    model, report = train_dlrm(config, readers, options, out=tmp_path / "model")
    # Stable after a few epochs on this sample: the DLRM beats the constant predictor clearly.
    assert report.model.auc > 0.65 and report.model.logloss < report.constant.logloss
    assert report.logistic.auc > 0.6
    assert report.rows == {"train": 7200, "dev": 409, "test": 391}
    # The saved folder is the model that was measured, on raw (unmapped) hashed ids.
    test = Tabular.from_batches(split_readers("criteo", config, shared_data / CRITEO)["test"])
    loaded = load_model(tmp_path / "model")
    assert torch.allclose(predict(loaded, test), predict(model, test), atol=1e-6)
    assert roc_auc(test.labels, predict(loaded, test)) == pytest.approx(report.model.auc)
    # Seeded: a second run gives the same figures.
    _, again = train_dlrm(config, split_readers("criteo", config, shared_data / CRITEO), options)
    assert again.model == report.model and again.logistic == report.logistic


def test_train_cli_json(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--data", str(shared_data / CRITEO), "--out", str(tmp_path / "m")]
    args += ["--epochs", "1", "--rows-per-table", "512", "--dim", "4", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["test"]) == {"dlrm", "logistic_regression", "constant"}
    assert report["folder"] == str(tmp_path / "m") and (tmp_path / "m" / "config.json").is_file()
    assert main(["train", "--epochs", "1"]) == 2
    assert "no train file" in capsys.readouterr().err


def test_cross_validation_predicts_every_example_once(shared_data: Path) -> None:
    config = criteo_dlrm_config(rows_per_table=512, dim=4, interaction="cat")
    readers = split_readers("criteo", config, shared_data / CRITEO)
    cv = cross_validate(config, readers, folds=3, options=TrainOptions(epochs=2, patience=2))
    assert cv.rows == 8000 and len(cv.folds) == 3
    for fold in cv.folds:
        assert set(fold) == {"dlrm", "logistic_regression", "constant"}
        assert fold["constant"].auc == pytest.approx(0.5)
        assert fold["dlrm"].auc > 0.6  # learns something on every fold
    # Pooled metrics are those of all out-of-fold predictions, not a mean of the folds.
    assert cv.pooled["dlrm"].logloss == pytest.approx(
        sum(f["dlrm"].logloss * n for f, n in zip(cv.folds, (2667, 2667, 2666), strict=True))
        / 8000,
        rel=1e-4,
    )
    assert cv.beats_baselines == (
        cv.pooled["dlrm"].auc > cv.pooled["logistic_regression"].auc
        and cv.pooled["dlrm"].logloss < cv.pooled["logistic_regression"].logloss
        and cv.pooled["dlrm"].logloss < cv.pooled["constant"].logloss
    )
    with pytest.raises(ValueError, match="at least 3 folds"):
        cross_validate(config, readers, folds=2)
