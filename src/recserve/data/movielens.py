"""MovieLens ratings for NCF: explicit ratings, implicit feedback with sampled negatives, and
the NCF paper's ML-1M leave-one-out evaluation files.

Formats:

- ``u.data`` (ML-100K) and NCF's ``*.rating`` files: ``user  item  rating  timestamp``,
  tab-separated, no header. ML-100K ids start at 1, NCF's re-indexed files at 0 (``id_base``).
- NCF's ``*.test.negative``: line i belongs to line i of ``test.rating``:
  ``(user,item)`` then 99 tab-separated item ids the user never rated.

Requests feed an NCF model (:func:`ncf_config`): four pooled tables ``mf_user``, ``mf_item``,
``mlp_user``, ``mlp_item`` with one id each (the user id in the user tables, the item id in the
item tables) and no dense features. Ids are used as rows directly (``id - id_base``); an id
outside its table is an error naming the line.

Implicit feedback (NCF): every rating is a positive (label 1); with ``num_negatives = k``
each positive is followed by k items the user never rated (label 0), drawn uniformly from
``[0, num_items)``. Finding "never rated" takes one pass over the file first that keeps each
user's rated items (the interaction set, not the file's text).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from recserve.config import ModelConfig, TableConfig
from recserve.data.common import (
    DataFileError,
    LabeledBatch,
    iter_line_chunks,
    iter_lines,
    make_batch,
    parse_floats,
)

NCF_TABLES: tuple[str, ...] = ("mf_user", "mf_item", "mlp_user", "mlp_item")
ML100K_USERS, ML100K_ITEMS = 943, 1682
"""Users and items of MovieLens 100K (``u.data``, ids from 1)."""
NCF_ML1M_USERS, NCF_ML1M_ITEMS = 6040, 3706
"""Users and items of NCF's re-indexed MovieLens 1M files (ids from 0)."""
RATING_COLUMNS: tuple[str, ...] = ("user", "item", "rating", "timestamp")
Target = Literal["implicit", "rating"]


def ncf_config(
    num_users: int,
    num_items: int,
    dim: int = 16,
    mlp: Sequence[int] = (32, 16, 8),
    mlp_dim: int | None = None,
    name: str = "ncf-movielens",
) -> ModelConfig:
    """An NCF (NeuMF) model: GMF tables of ``dim``, MLP tables of ``mlp_dim`` (default
    ``mlp[0] // 2``), MLP ``(2·mlp_dim, *mlp[1:])``. ML-100K: 943 users, 1682 items; NCF's
    ML-1M files: 6040 users, 3706 items."""
    mlp_dim = mlp_dim if mlp_dim is not None else max(1, mlp[0] // 2)
    tables = (
        TableConfig("mf_user", num_users, dim),
        TableConfig("mf_item", num_items, dim),
        TableConfig("mlp_user", num_users, mlp_dim),
        TableConfig("mlp_item", num_items, mlp_dim),
    )
    return ModelConfig(name, "ncf", tables, top_mlp=(2 * mlp_dim, *mlp[1:]))


def _check_ncf(config: ModelConfig) -> tuple[int, int]:
    if config.feature_keys != NCF_TABLES or config.num_dense != 0:
        raise ValueError(
            f"MovieLens readers feed NCF models with tables {list(NCF_TABLES)} and no dense "
            f"features; model {config.name!r} has {list(config.feature_keys)}"
        )
    users, items = (config.table(n).num_rows for n in ("mf_user", "mf_item"))
    if config.table("mlp_user").num_rows != users or config.table("mlp_item").num_rows != items:
        raise ValueError(f"model {config.name!r}: GMF and MLP tables must have the same rows")
    return users, items


def ncf_batch(users: np.ndarray, items: np.ndarray) -> LabeledBatch:
    """A request for (user, item) pairs (labels left at 0)."""
    ids = np.stack([users, items, users, items], axis=1)
    batch = make_batch(np.zeros((len(users), 0), dtype=np.float32), ids, NCF_TABLES)
    return LabeledBatch(batch, torch.zeros(len(users)))


class MovieLensReader:
    """Stream a ratings file as labelled NCF requests of ``batch_size`` items.

    ``config`` is the NCF model fed (default: :func:`ncf_config` sized for ML-100K).
    ``target="rating"``: labels are the ratings (no negatives). ``target="implicit"``: labels
    are 1 for rated pairs, followed by ``num_negatives`` sampled unrated items (label 0) per
    positive; sampling is seeded, so two passes give the same batches.
    """

    def __init__(
        self,
        path: str | Path,
        config: ModelConfig | None = None,
        batch_size: int = 1024,
        id_base: int = 1,
        target: Target = "implicit",
        num_negatives: int = 0,
        seed: int = 0,
    ) -> None:
        self.path = Path(path)
        self.config = config if config is not None else ncf_config(ML100K_USERS, ML100K_ITEMS)
        self.num_users, self.num_items = _check_ncf(self.config)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if target not in ("implicit", "rating"):
            raise ValueError(f"target must be 'implicit' or 'rating', got {target!r}")
        if num_negatives < 0 or (num_negatives and target != "implicit"):
            raise ValueError("num_negatives must be >= 0, and 0 unless target='implicit'")
        self.batch_size, self.id_base = batch_size, id_base
        self.target: Target = target
        self.num_negatives, self.seed = num_negatives, seed

    def _pairs(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(users, items, ratings)`` per chunk of lines, ids rebased and range-checked."""
        for lines, rows in iter_line_chunks(self.path, 4, "\t", self.batch_size):
            values = parse_floats(
                np.array(rows, dtype=np.str_), self.path, lines, RATING_COLUMNS, empty=None
            )
            users = self._ids(values[:, 0], self.num_users, "user", lines)
            items = self._ids(values[:, 1], self.num_items, "item", lines)
            yield users, items, values[:, 2].astype(np.float32)

    def _ids(self, raw: np.ndarray, rows: int, what: str, lines: Sequence[int]) -> np.ndarray:
        ids = raw - self.id_base
        bad = (ids < 0) | (ids >= rows) | (ids != np.floor(ids))
        if bad.any():
            r = int(np.argwhere(bad)[0, 0])
            raise DataFileError(
                self.path,
                f"{what} id {raw[r]:g} is outside the model's {rows} {what}s "
                f"(ids start at {self.id_base})",
                lines[r],
            )
        return ids.astype(np.int64)

    def rated_items(self) -> dict[int, set[int]]:
        """Each user's rated items (one pass over the file)."""
        rated: dict[int, set[int]] = {}
        for users, items, _ in self._pairs():
            for u, i in zip(users.tolist(), items.tolist(), strict=True):
                rated.setdefault(u, set()).add(i)
        return rated

    def __iter__(self) -> Iterator[LabeledBatch]:
        if self.target == "rating" or self.num_negatives == 0:
            for users, items, ratings in self._pairs():
                lb = ncf_batch(users, items)
                labels = ratings if self.target == "rating" else np.ones_like(ratings)
                yield LabeledBatch(lb.batch, torch.from_numpy(labels))
            return
        yield from self._with_negatives()

    def _with_negatives(self) -> Iterator[LabeledBatch]:
        rated = self.rated_items()
        rng = np.random.default_rng(self.seed)
        k = self.num_negatives
        pending_u: list[np.ndarray] = []
        pending_i: list[np.ndarray] = []
        pending_y: list[np.ndarray] = []
        count = 0
        for users, items, _ in self._pairs():
            negatives = rng.integers(self.num_items, size=(len(users), k))
            for r, u in enumerate(users.tolist()):
                seen = rated[u]
                if len(seen) >= self.num_items:
                    raise ValueError(f"{self.path}: user {u} rated every item; no negatives")
                row = negatives[r]
                for j in range(k):
                    while int(row[j]) in seen:  # rejection: redraw items the user rated
                        row[j] = rng.integers(self.num_items)
            # Each positive is followed by its negatives.
            pending_u.append(np.repeat(users, k + 1))
            pending_i.append(np.concatenate([items[:, None], negatives], axis=1).reshape(-1))
            pending_y.append(np.tile(np.r_[1.0, np.zeros(k)].astype(np.float32), len(users)))
            count += len(users) * (k + 1)
            while count >= self.batch_size:
                u_all, i_all, y_all = (np.concatenate(p) for p in (pending_u, pending_i, pending_y))
                b = self.batch_size
                yield self._labeled(u_all[:b], i_all[:b], y_all[:b])
                pending_u, pending_i, pending_y = [u_all[b:]], [i_all[b:]], [y_all[b:]]
                count -= b
        if count:
            u_all, i_all, y_all = (np.concatenate(p) for p in (pending_u, pending_i, pending_y))
            yield self._labeled(u_all, i_all, y_all)

    @staticmethod
    def _labeled(users: np.ndarray, items: np.ndarray, labels: np.ndarray) -> LabeledBatch:
        lb = ncf_batch(users, items)
        return LabeledBatch(lb.batch, torch.from_numpy(np.ascontiguousarray(labels)))


class NcfEvalReader:
    """NCF's leave-one-out evaluation: per user, the held-out item and its sampled negatives.

    Yields batches of ``users_per_batch`` users × ``1 + negatives`` candidates (item-major per
    user: the held-out positive first, label 1, then the negatives, label 0). Score them with
    the model, reshape to ``[users, candidates]`` and pass to :func:`hit_ratio_ndcg`.
    ``config`` defaults to :func:`ncf_config` sized for NCF's ML-1M files.
    """

    def __init__(
        self,
        rating_path: str | Path,
        negative_path: str | Path,
        config: ModelConfig | None = None,
        users_per_batch: int = 256,
        id_base: int = 0,
    ) -> None:
        self.rating_path, self.negative_path = Path(rating_path), Path(negative_path)
        self.config = config if config is not None else ncf_config(NCF_ML1M_USERS, NCF_ML1M_ITEMS)
        self.num_users, self.num_items = _check_ncf(self.config)
        if users_per_batch <= 0:
            raise ValueError(f"users_per_batch must be positive, got {users_per_batch}")
        self.users_per_batch, self.id_base = users_per_batch, id_base

    def __iter__(self) -> Iterator[LabeledBatch]:
        users: list[int] = []
        candidates: list[list[int]] = []
        negatives = iter_lines(self.negative_path)
        for number, line in iter_lines(self.rating_path):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 4:
                raise DataFileError(
                    self.rating_path, f"expected 4 columns, found {len(fields)}", number
                )
            user, item = (
                self._int(fields[0], self.rating_path, number),
                self._int(fields[1], self.rating_path, number),
            )
            neg_number, neg_line = next(negatives, (number, ""))
            neg = neg_line.split("\t")
            if neg[0] != f"({user},{item})":
                raise DataFileError(
                    self.negative_path,
                    f"expected '({user},{item})' to match {self.rating_path.name} line {number},"
                    f" found {neg[0]!r}",
                    neg_number,
                )
            items = [item] + [self._int(t, self.negative_path, neg_number) for t in neg[1:] if t]
            if candidates and len(items) != len(candidates[0]):
                raise DataFileError(
                    self.negative_path,
                    f"expected {len(candidates[0]) - 1} negatives, found {len(items) - 1}",
                    neg_number,
                )
            self._check(user, self.num_users, "user", self.rating_path, number)
            self._check(item, self.num_items, "item", self.rating_path, number)
            for i in items[1:]:
                self._check(i, self.num_items, "item", self.negative_path, neg_number)
            users.append(user - self.id_base)
            candidates.append([i - self.id_base for i in items])
            if len(users) == self.users_per_batch:
                yield self._batch(users, candidates)
                users, candidates = [], []
        if users:
            yield self._batch(users, candidates)

    @staticmethod
    def _int(token: str, path: Path, line: int) -> int:
        try:
            return int(token)
        except ValueError:
            raise DataFileError(path, f"expected an integer id, found {token!r}", line) from None

    def _check(self, raw: int, rows: int, what: str, path: Path, line: int) -> None:
        if not 0 <= raw - self.id_base < rows:
            raise DataFileError(
                path, f"{what} id {raw} is outside the model's {rows} {what}s", line
            )

    @staticmethod
    def _batch(users: list[int], candidates: list[list[int]]) -> LabeledBatch:
        n = len(candidates[0])
        items = np.asarray(candidates, dtype=np.int64).reshape(-1)
        lb = ncf_batch(np.repeat(np.asarray(users, dtype=np.int64), n), items)
        labels = np.zeros((len(users), n), dtype=np.float32)
        labels[:, 0] = 1.0
        return LabeledBatch(lb.batch, torch.from_numpy(labels.reshape(-1)))


def hit_ratio_ndcg(scores: torch.Tensor, k: int = 10) -> tuple[float, float]:
    """HR@k and NDCG@k of ``scores [U, C]`` whose column 0 is each user's held-out positive.

    The positive's rank counts the candidates scored strictly higher (ties in its favour, as
    NCF's heapq-based evaluation mostly does); NDCG = ``1 / log2(rank + 2)`` when in the top k.
    """
    rank = (scores[:, 1:] > scores[:, :1]).sum(dim=1)
    hit = rank < k
    ndcg = torch.where(
        hit, 1.0 / torch.log2(rank.double() + 2.0), torch.zeros((), dtype=torch.float64)
    )
    return float(hit.double().mean()), float(ndcg.mean())
