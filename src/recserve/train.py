"""Fit a small DLRM on a labelled CTR dataset on the CPU, against honest baselines.

What ``recserve train`` runs: read the train/dev/test files with a streaming reader
(:mod:`recserve.data`), fit a recserve DLRM (built with :func:`~recserve.models.build_model`,
trained through its own forward), fit a logistic regression on the same features and the same
split, and report logloss and AUC on the test split for both and for a constant predictor (the
train split's click rate). The DLRM is saved with :func:`~recserve.models.save_model`, so it
can be served like any other model.

Training recipe (DLRM and logistic regression alike):

- Rare categories: ids seen fewer than ``min_count`` times in a table on the train split share
  one row (the table's least-used row), as Criteo pipelines do with a frequency threshold.
  Before saving, that shared row is copied into every rare row, so the served model gives a
  raw hashed id exactly the embedding training gave it: no vocabulary file is needed.
- Embedding rows: row-wise Adagrad on the rows a batch touches (TorchRec's default for
  tables); dense layers: Adam. Early stopping on the dev split's logloss, best epoch kept.
- Seeded: the same seed gives the same model and the same figures.

Everything is held in memory after reading (``[N, n_dense]`` floats and ``[N, T]`` ids): fine
for the samples this is meant for, not for the full 45M-line Criteo file.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recserve.config import Interaction, ModelConfig
from recserve.data.avazu import AvazuReader, avazu_dlrm_config
from recserve.data.common import HashKind, LabeledBatch, make_batch
from recserve.data.criteo import CriteoReader, criteo_dlrm_config
from recserve.embedding.backend import TorchBackend
from recserve.models import build_model, save_model
from recserve.models.base import RecModel
from recserve.types import Batch

Scorer = Callable[[Batch], torch.Tensor]


# --- metrics ---------------------------------------------------------------------------------


def roc_auc(labels: torch.Tensor, scores: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); 0.5 when only
    one class is present."""
    y = labels.detach().double().cpu().numpy().reshape(-1)
    s = scores.detach().double().cpu().numpy().reshape(-1)
    pos = float(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return 0.5
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def log_loss(labels: torch.Tensor, probs: torch.Tensor, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, probabilities clipped to ``[eps, 1 - eps]``."""
    p = probs.detach().double().reshape(-1).clamp(eps, 1 - eps)
    y = labels.detach().double().reshape(-1)
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


@dataclass(frozen=True)
class Metrics:
    logloss: float
    auc: float


# --- data held in memory ---------------------------------------------------------------------


@dataclass
class Tabular:
    """An encoded split: ``dense [N, n_dense]`` float32, ``ids [N, T]`` int64 (one id per item
    per table), ``labels [N]`` float32, and the feature keys of ``ids``' columns."""

    dense: torch.Tensor
    ids: torch.Tensor
    labels: torch.Tensor
    keys: tuple[str, ...]

    @classmethod
    def from_batches(cls, batches: Iterable[LabeledBatch]) -> Tabular:
        dense, ids, labels = [], [], []
        keys: tuple[str, ...] = ()
        for lb in batches:
            sparse = lb.batch.sparse
            if not bool((sparse.lengths == 1).all()):
                raise ValueError("training needs exactly one id per item per feature")
            keys = sparse.keys
            dense.append(lb.batch.dense)
            ids.append(sparse.values.view(len(keys), -1).t())
            labels.append(lb.labels)
        if not labels:
            raise ValueError("no examples")
        return cls(torch.cat(dense), torch.cat(ids).contiguous(), torch.cat(labels), keys)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor | slice) -> Batch:
        return make_batch(self.dense[index], self.ids[index], self.keys)

    def with_ids(self, ids: torch.Tensor) -> Tabular:
        return Tabular(self.dense, ids, self.labels, self.keys)


@dataclass
class RareRows:
    """Per table, a map ``row -> row`` sending rows seen fewer than ``min_count`` times on the
    train split to one shared row (the table's least-used row)."""

    maps: list[torch.Tensor]
    shared: list[int | None]
    """The shared row of each table (None: no rare rows, the map is the identity)."""

    @classmethod
    def fit(cls, ids: torch.Tensor, num_rows: Sequence[int], min_count: int) -> RareRows:
        maps: list[torch.Tensor] = []
        shared: list[int | None] = []
        for t, rows in enumerate(num_rows):
            counts = torch.bincount(ids[:, t], minlength=rows)
            row = int(torch.argmin(counts))
            identity = torch.arange(rows)
            if min_count <= 1 or int(counts[row]) >= min_count:
                maps.append(identity)
                shared.append(None)
                continue
            maps.append(torch.where(counts >= min_count, identity, torch.full_like(identity, row)))
            shared.append(row)
        return cls(maps, shared)

    def apply(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.stack([m[ids[:, t]] for t, m in enumerate(self.maps)], dim=1)

    @torch.no_grad()
    def fold_into(self, tables: Sequence[torch.Tensor]) -> None:
        """Copy each shared row into the rows mapped to it, so raw ids give the same rows."""
        for weight, m, row in zip(tables, self.maps, self.shared, strict=True):
            if row is not None:
                rare = (m == row).nonzero().view(-1)
                weight[rare] = weight[row].clone()


# --- models ----------------------------------------------------------------------------------


class LogisticRegression(nn.Module):
    """The baseline: ``p = sigmoid(w · dense + Σ_t v_t[id_t] + b)``, one scalar weight per row
    of every table (one-hot hashed categoricals), on the same requests as the DLRM."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.linear = nn.Linear(config.num_dense, 1) if config.num_dense else None
        if self.linear is not None:  # convex: start from zero, independent of any RNG state
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)
        self.bias = nn.Parameter(torch.zeros(1))
        self.tables = nn.ParameterList(
            nn.Parameter(torch.zeros(t.num_rows, 1)) for t in config.pooled_tables
        )

    def forward(self, batch: Batch) -> torch.Tensor:
        b = batch.batch_size
        logit = self.bias.expand(b, 1)
        if self.linear is not None:
            logit = logit + self.linear(batch.dense)
        sparse = batch.sparse
        starts = sparse.key_offsets()
        for t, weight in enumerate(self.tables):
            ids = sparse.values[starts[t] : starts[t + 1]]
            offsets = sparse.offsets[t * b : (t + 1) * b + 1] - starts[t]
            logit = logit + F.embedding_bag(ids, weight, offsets, include_last_offset=True)
        return torch.sigmoid(logit)


def embedding_tables(model: nn.Module) -> list[torch.Tensor]:
    """The embedding tables of a model: a recserve model's TorchBackend weights (created
    without gradients, for serving; :func:`fit` turns them on while it trains), or the
    baseline's per-row weights."""
    if isinstance(model, LogisticRegression):
        return list(model.tables)
    assert isinstance(model, RecModel)
    backend = model.sparse.backend
    if not isinstance(backend, TorchBackend):
        raise ValueError("training needs the pure-torch embedding backend (TorchBackend)")
    if any(t.dtype != "fp32" for t in model.config.tables):
        raise ValueError("training needs fp32 tables")
    return list(backend.weights)


class RowwiseAdagrad:
    """Row-wise Adagrad over the rows a batch touched: per row one accumulator of the mean
    squared gradient, ``w[r] -= lr · g[r] / (sqrt(acc[r]) + eps)``. Rows a batch did not touch
    are left alone (no decay, no momentum drift), as TorchRec's fused optimiser does."""

    def __init__(
        self,
        tables: Sequence[torch.Tensor],
        lr: float,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
    ) -> None:
        self.tables, self.lr, self.weight_decay, self.eps = list(tables), lr, weight_decay, eps
        self.state = [torch.zeros(t.shape[0]) for t in self.tables]

    def zero_grad(self) -> None:
        for t in self.tables:
            t.grad = None

    @torch.no_grad()
    def step(self, touched: Sequence[torch.Tensor]) -> None:
        for weight, acc, rows in zip(self.tables, self.state, touched, strict=True):
            if weight.grad is None:
                continue
            rows = torch.unique(rows)
            grad = weight.grad[rows]
            if self.weight_decay:
                grad = grad + self.weight_decay * weight[rows]
            acc[rows] += grad.pow(2).mean(dim=1)
            weight[rows] -= self.lr * grad / (acc[rows].sqrt() + self.eps).unsqueeze(1)


# --- fitting ---------------------------------------------------------------------------------


@dataclass
class TrainOptions:
    """How models are fitted."""

    epochs: int = 40
    """Most passes over the train split (early stopping usually ends sooner)."""
    batch_size: int = 256
    lr: float = 1e-3
    """Adam learning rate of the dense layers."""
    embedding_lr: float = 0.02
    """Row-wise Adagrad learning rate of the embedding rows."""
    weight_decay: float = 1e-3
    """L2 on the dense layers (Adam's coupled weight decay)."""
    embedding_weight_decay: float = 0.0
    """L2 on the embedding rows a batch touches."""
    min_count: int = 40
    """Ids seen fewer times than this in a table on the train split share one row."""
    patience: int = 5
    """Epochs without a better dev logloss before stopping."""
    seed: int = 0
    threads: int | None = 1
    """Intra-op CPU threads while fitting (small batches run fastest on one, and one thread
    keeps results bit-identical run to run); None leaves torch's setting."""


@dataclass
class FitResult:
    best_epoch: int
    epochs_run: int
    dev: Metrics
    history: list[dict[str, float]] = field(default_factory=list)


def evaluate(model: Scorer, data: Tabular, batch_size: int = 4096) -> Metrics:
    probs = predict(model, data, batch_size)
    return Metrics(log_loss(data.labels, probs), roc_auc(data.labels, probs))


@torch.no_grad()
def predict(model: Scorer, data: Tabular, batch_size: int = 4096) -> torch.Tensor:
    """Probabilities ``[N]`` of the first task for every item of ``data``."""
    if isinstance(model, nn.Module):
        model.eval()
    out = [
        model(data.batch(slice(s, s + batch_size)))[:, 0] for s in range(0, len(data), batch_size)
    ]
    return torch.cat(out)


def fit(
    model: nn.Module,
    train: Tabular,
    dev: Tabular,
    options: TrainOptions,
    on_step: Callable[[int, float], None] | None = None,
) -> FitResult:
    """Minimise binary cross-entropy on ``train``; keep the epoch with the best dev logloss.

    ``on_step(epoch, loss)`` is called after every optimiser step (for progress bars).
    """
    torch.manual_seed(options.seed)
    tables = embedding_tables(model)
    for t in tables:
        t.requires_grad_(True)
    table_ids = {id(t) for t in tables}
    dense_params = [p for p in model.parameters() if id(p) not in table_ids]
    adam = torch.optim.Adam(dense_params, lr=options.lr, weight_decay=options.weight_decay)
    adagrad = RowwiseAdagrad(tables, options.embedding_lr, options.embedding_weight_decay)
    gen = torch.Generator().manual_seed(options.seed)
    best: tuple[float, int, dict[str, Any]] = (math.inf, -1, {})
    history: list[dict[str, float]] = []
    epoch = 0
    for epoch in range(options.epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        for start in range(0, len(order), options.batch_size):
            index = order[start : start + options.batch_size]
            ids = train.ids[index]
            probs = model(make_batch(train.dense[index], ids, train.keys))[:, 0]
            loss = F.binary_cross_entropy(probs.clamp(1e-7, 1 - 1e-7), train.labels[index])
            adam.zero_grad()
            adagrad.zero_grad()
            loss.backward()
            adam.step()
            adagrad.step(ids.unbind(1))
            if on_step is not None:
                on_step(epoch, float(loss.detach()))
        metrics = evaluate(model, dev)
        history.append({"epoch": epoch, "dev_logloss": metrics.logloss, "dev_auc": metrics.auc})
        if metrics.logloss < best[0]:
            best = (metrics.logloss, epoch, copy.deepcopy(model.state_dict()))
        elif epoch - best[1] >= options.patience:
            break
    model.load_state_dict(best[2])
    for t in tables:
        t.requires_grad_(False)
    model.eval()
    dev_metrics = Metrics(best[0], history[best[1]]["dev_auc"])
    return FitResult(best[1], epoch + 1, dev_metrics, history)


# --- the whole run ---------------------------------------------------------------------------


@dataclass
class TrainReport:
    """What a run measured: test metrics of each model, and how they were fitted."""

    model: Metrics
    """The DLRM on the test split."""
    logistic: Metrics
    """The logistic regression on the test split."""
    constant: Metrics
    """The train split's click rate as every prediction, on the test split."""
    constant_dev: Metrics
    base_rate: float
    seconds: float
    """Wall time of fitting the DLRM (not reading, not the baselines)."""
    fit: FitResult
    logistic_fit: FitResult
    config: ModelConfig
    options: TrainOptions
    rows: dict[str, int]
    folder: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "test": {
                "dlrm": asdict(self.model),
                "logistic_regression": asdict(self.logistic),
                "constant": asdict(self.constant),
            },
            "dev": {
                "dlrm": asdict(self.fit.dev),
                "logistic_regression": asdict(self.logistic_fit.dev),
                "constant": asdict(self.constant_dev),
            },
            "beats_baselines": self.beats_baselines,
            "base_rate": self.base_rate,
            "train_seconds": self.seconds,
            "best_epoch": self.fit.best_epoch,
            "epochs_run": self.fit.epochs_run,
            "history": self.fit.history,
            "rows": self.rows,
            "options": asdict(self.options),
            "model": self.config.name,
            "interaction": self.config.interaction,
            "folder": self.folder,
        }

    @property
    def beats_baselines(self) -> bool:
        """Whether the DLRM has both a higher test AUC and a lower test logloss than both
        baselines."""
        return self.model.auc > max(self.logistic.auc, 0.5) and self.model.logloss < min(
            self.logistic.logloss, self.constant.logloss
        )


def train_dlrm(
    config: ModelConfig,
    splits: dict[str, Iterable[LabeledBatch]],
    options: TrainOptions | None = None,
    out: str | Path | None = None,
    on_step: Callable[[str, int, float], None] | None = None,
) -> tuple[RecModel, TrainReport]:
    """Fit ``config`` (a DLRM) and the logistic-regression baseline on ``splits["train"]``
    (early stopping on ``"dev"``), measure all on ``"test"``, save the DLRM to ``out``.

    ``on_step(which, epoch, loss)`` reports progress; ``which`` is ``"dlrm"`` or ``"logistic"``.
    """
    options = options or TrainOptions()
    threads = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    try:
        return _train_dlrm(config, splits, options, out, on_step)
    finally:
        torch.set_num_threads(threads)


def _train_dlrm(
    config: ModelConfig,
    splits: dict[str, Iterable[LabeledBatch]],
    options: TrainOptions,
    out: str | Path | None,
    on_step: Callable[[str, int, float], None] | None,
) -> tuple[RecModel, TrainReport]:
    data = {name: Tabular.from_batches(splits[name]) for name in ("train", "dev", "test")}
    rare = RareRows.fit(
        data["train"].ids, [t.num_rows for t in config.pooled_tables], options.min_count
    )
    mapped = {name: d.with_ids(rare.apply(d.ids)) for name, d in data.items()}

    def progress(which: str) -> Callable[[int, float], None] | None:
        return None if on_step is None else (lambda epoch, loss: on_step(which, epoch, loss))

    model = build_model(config, seed=options.seed)
    start = time.perf_counter()
    result = fit(model, mapped["train"], mapped["dev"], options, progress("dlrm"))
    seconds = time.perf_counter() - start
    rare.fold_into(embedding_tables(model))
    # Measured on raw ids: the folded model is exactly what gets saved and served.
    model_metrics = evaluate(model, data["test"])

    logistic = LogisticRegression(config)
    logistic_fit = fit(logistic, mapped["train"], mapped["dev"], options, progress("logistic"))
    logistic_metrics = evaluate(logistic, mapped["test"])

    base_rate = float(data["train"].labels.mean())
    constant = {
        split: Metrics(log_loss(y, torch.full_like(y, base_rate)), 0.5)
        for split, y in ((s, data[s].labels) for s in ("dev", "test"))
    }
    folder = str(save_model(model, out)) if out is not None else None
    report = TrainReport(
        model_metrics,
        logistic_metrics,
        constant["test"],
        constant["dev"],
        base_rate,
        seconds,
        result,
        logistic_fit,
        config,
        options,
        {name: len(d) for name, d in data.items()},
        folder,
    )
    return model, report


@dataclass
class CrossValidation:
    """K-fold cross-validation of the DLRM against the logistic regression on all examples.

    Fold ``k`` is the test set, fold ``k + 1`` the dev set (early stopping), the rest the train
    set; every example is predicted once, by models that never saw it. ``pooled`` holds the
    metrics of those out-of-fold predictions (a test set the size of the whole data, so far
    less noisy than one small test split)."""

    folds: list[dict[str, Metrics]]
    pooled: dict[str, Metrics]
    rows: int
    seconds: float

    @property
    def beats_baselines(self) -> bool:
        """Higher pooled AUC and lower pooled logloss than the logistic regression (and the
        constant predictor)."""
        d, lr, c = self.pooled["dlrm"], self.pooled["logistic_regression"], self.pooled["constant"]
        return d.auc > max(lr.auc, c.auc) and d.logloss < min(lr.logloss, c.logloss)

    def to_dict(self) -> dict[str, Any]:
        return {
            "folds": [{k: asdict(m) for k, m in f.items()} for f in self.folds],
            "pooled": {k: asdict(m) for k, m in self.pooled.items()},
            "beats_baselines": self.beats_baselines,
            "rows": self.rows,
            "seconds": self.seconds,
        }


def cross_validate(
    config: ModelConfig,
    splits: dict[str, Iterable[LabeledBatch]],
    folds: int = 5,
    options: TrainOptions | None = None,
    on_fold: Callable[[int, dict[str, Metrics]], None] | None = None,
) -> CrossValidation:
    """Pool every split of ``splits``, shuffle (``options.seed``) and cross-validate the DLRM,
    the logistic regression and the constant predictor over ``folds`` folds."""
    if folds < 3:
        raise ValueError(f"cross-validation needs at least 3 folds (train, dev, test), got {folds}")
    options = options or TrainOptions()
    threads = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    began = time.perf_counter()
    try:
        parts = [Tabular.from_batches(b) for b in splits.values()]
        every = Tabular(
            torch.cat([p.dense for p in parts]),
            torch.cat([p.ids for p in parts]),
            torch.cat([p.labels for p in parts]),
            parts[0].keys,
        )
        order = torch.randperm(len(every), generator=torch.Generator().manual_seed(options.seed))
        chunks = order.chunk(folds)
        if len(chunks) < folds:
            raise ValueError(f"{len(every)} examples cannot make {folds} folds")

        def take(index: torch.Tensor) -> Tabular:
            return Tabular(every.dense[index], every.ids[index], every.labels[index], every.keys)

        scores: dict[str, list[torch.Tensor]] = {"dlrm": [], "logistic_regression": []}
        const, labels, per_fold = [], [], []
        for k in range(folds):
            dev_k = (k + 1) % folds
            train = take(torch.cat([c for j, c in enumerate(chunks) if j not in (k, dev_k)]))
            dev, test = take(chunks[dev_k]), take(chunks[k])
            rare = RareRows.fit(
                train.ids, [t.num_rows for t in config.pooled_tables], options.min_count
            )
            train, dev, test = (d.with_ids(rare.apply(d.ids)) for d in (train, dev, test))
            fold_scores = {}
            for name, model in (
                ("dlrm", build_model(config, seed=options.seed)),
                ("logistic_regression", LogisticRegression(config)),
            ):
                fit(model, train, dev, options)
                with torch.no_grad():
                    fold_scores[name] = predict(model, test)
                scores[name].append(fold_scores[name])
            rate = float(train.labels.mean())
            fold_scores["constant"] = torch.full_like(test.labels, rate)
            const.append(fold_scores["constant"])
            labels.append(test.labels)
            metrics = {n: _metrics(test.labels, p) for n, p in fold_scores.items()}
            per_fold.append(metrics)
            if on_fold is not None:
                on_fold(k, metrics)
        y = torch.cat(labels)
        pooled = {n: _metrics(y, torch.cat(p)) for n, p in scores.items()}
        pooled["constant"] = _metrics(y, torch.cat(const))
        return CrossValidation(per_fold, pooled, len(every), time.perf_counter() - began)
    finally:
        torch.set_num_threads(threads)


def _metrics(labels: torch.Tensor, probs: torch.Tensor) -> Metrics:
    return Metrics(log_loss(labels, probs), roc_auc(labels, probs))


# --- datasets on disk ------------------------------------------------------------------------

DATASETS: tuple[str, ...] = ("criteo", "avazu")
SPLIT_FILES: dict[str, tuple[str, str, str]] = {
    "criteo": ("train.tsv", "dev.tsv", "test.tsv"),
    "avazu": ("train.csv", "dev.csv", "test.csv"),
}


def dataset_config(
    dataset: str,
    rows_per_table: int = 4096,
    dim: int = 8,
    bottom_hidden: Sequence[int] = (64,),
    top_hidden: Sequence[int] = (64,),
    interaction: Interaction = "cat",
) -> ModelConfig:
    """The DLRM a dataset's reader feeds (Criteo: 13 dense, 26 tables; Avazu: 3 dense, 21)."""
    build = {"criteo": criteo_dlrm_config, "avazu": avazu_dlrm_config}.get(dataset)
    if build is None:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {dataset!r}")
    return build(rows_per_table, dim, bottom_hidden, top_hidden, interaction)


def split_readers(
    dataset: str,
    config: ModelConfig,
    data_dir: str | Path | None = None,
    files: dict[str, str | Path] | None = None,
    hash: HashKind = "hex",
) -> dict[str, Iterable[LabeledBatch]]:
    """Streaming readers of the train/dev/test splits: ``files`` by split name, or the
    dataset's usual file names (:data:`SPLIT_FILES`) in ``data_dir``."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {dataset!r}")
    paths: dict[str, Path] = {}
    for split, default in zip(("train", "dev", "test"), SPLIT_FILES[dataset], strict=True):
        given = (files or {}).get(split)
        if given is None and data_dir is None:
            raise ValueError(f"no {split} file: give a data folder or the {split} file")
        paths[split] = Path(given) if given is not None else Path(data_dir or ".") / default
    if dataset == "criteo":
        return {s: CriteoReader(p, config, 4096, hash=hash) for s, p in paths.items()}
    return {s: AvazuReader(p, config, 4096) for s, p in paths.items()}
