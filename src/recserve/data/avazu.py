"""Avazu click-through data (Kaggle 2014 ``train.csv``).

Format: comma-separated, 24 columns; the original ``train.csv`` starts with this header (the
split files of the sample have none; a header is detected by its first field ``id``)::

    id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,
    app_category,device_id,device_ip,device_model,device_type,device_conn_type,C14,…,C21

``id`` is a uint64 that is not a feature; ``click`` is the 0/1 label; ``hour`` is ``YYMMDDHH``.

Preprocessing: the 21 categorical columns (``C1`` … ``C21``, site/app/device fields, all
anonymised integers or 8-hex-digit hashes) are hashed into their tables with FNV-1a-64
(``% rows``). ``hour`` gives 3 dense time features: hour of day / 23, weekday / 6 (Monday 0)
and is-weekend (0/1).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from recserve.config import Interaction, ModelConfig
from recserve.data.common import (
    DataFileError,
    LabeledBatch,
    check_tabular_config,
    dlrm_config,
    first_line,
    hash_columns,
    iter_line_chunks,
    make_batch,
    parse_floats,
)

COLUMNS: tuple[str, ...] = (
    "id",
    "click",
    "hour",
    "C1",
    "banner_pos",
    "site_id",
    "site_domain",
    "site_category",
    "app_id",
    "app_domain",
    "app_category",
    "device_id",
    "device_ip",
    "device_model",
    "device_type",
    "device_conn_type",
    "C14",
    "C15",
    "C16",
    "C17",
    "C18",
    "C19",
    "C20",
    "C21",
)
CATEGORICAL_NAMES: tuple[str, ...] = COLUMNS[3:]
DENSE_NAMES: tuple[str, ...] = ("hour_of_day", "weekday", "weekend")
NUM_DENSE = len(DENSE_NAMES)
NUM_CATEGORICAL = len(CATEGORICAL_NAMES)


def avazu_dlrm_config(
    rows_per_table: int | Sequence[int] = 10_000,
    dim: int = 16,
    bottom_hidden: Sequence[int] = (16,),
    top_hidden: Sequence[int] = (64,),
    interaction: Interaction = "dot",
    name: str = "avazu-dlrm",
) -> ModelConfig:
    """A DLRM for Avazu: 3 dense time features, 21 tables named after the columns, L=1."""
    return dlrm_config(
        name,
        NUM_DENSE,
        CATEGORICAL_NAMES,
        rows_per_table,
        dim=dim,
        bottom_hidden=bottom_hidden,
        top_hidden=top_hidden,
        interaction=interaction,
    )


@lru_cache(maxsize=4096)
def _day_features(yymmdd: str) -> tuple[float, float]:
    """(weekday / 6, is-weekend) of a ``YYMMDD`` date; raises ValueError for a bad date."""
    day = datetime.date(2000 + int(yymmdd[:2]), int(yymmdd[2:4]), int(yymmdd[4:6]))
    return day.weekday() / 6.0, float(day.weekday() >= 5)


def time_features(hours: Sequence[str], path: str | Path, lines: Sequence[int]) -> np.ndarray:
    """Dense ``[B, 3]`` float32 from ``YYMMDDHH`` strings: hour/23, weekday/6, weekend."""
    out = np.empty((len(hours), NUM_DENSE), dtype=np.float32)
    for r, hour in enumerate(hours):
        try:
            if len(hour) != 8 or not hour.isdigit() or int(hour[6:]) > 23:
                raise ValueError(hour)
            weekday, weekend = _day_features(hour[:6])
        except ValueError:
            raise DataFileError(
                path, f"column 'hour': expected YYMMDDHH, found {hour!r}", lines[r]
            ) from None
        out[r] = (int(hour[6:]) / 23.0, weekday, weekend)
    return out


class AvazuReader:
    """Stream an Avazu CSV file as labelled recserve requests of ``batch_size`` items.

    ``config`` is the model fed (3 dense features, 21 pooled tables in column order); by
    default :func:`avazu_dlrm_config`.
    """

    def __init__(
        self,
        path: str | Path,
        config: ModelConfig | None = None,
        batch_size: int = 1024,
        header: bool | None = None,
    ) -> None:
        self.path = Path(path)
        self.config = config if config is not None else avazu_dlrm_config()
        check_tabular_config(self.config, NUM_DENSE, NUM_CATEGORICAL, "an Avazu reader")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self._header = header
        self.keys = self.config.feature_keys
        self.num_rows = [t.num_rows for t in self.config.pooled_tables]

    def __iter__(self) -> Iterator[LabeledBatch]:
        header = self._header
        if header is None:
            header = first_line(self.path).split(",", 1)[0] == "id"
        chunks = iter_line_chunks(self.path, len(COLUMNS), ",", self.batch_size, header)
        for lines, rows in chunks:
            yield self.parse(rows, lines)

    def parse(self, rows: Sequence[Sequence[str]], lines: Sequence[int]) -> LabeledBatch:
        """One batch from split lines (``rows [B][24]`` strings, ``lines`` their numbers)."""
        fields = np.array(rows, dtype=np.str_)
        labels = parse_floats(fields[:, 1:2], self.path, lines, ("click",), empty=None)
        bad = (labels != 0) & (labels != 1)
        if bad.any():
            r = int(np.argwhere(bad)[0, 0])
            raise DataFileError(
                self.path, f"column 'click' must be 0 or 1, found {rows[r][1]!r}", lines[r]
            )
        dense = time_features([row[2] for row in rows], self.path, lines)
        ids = hash_columns(fields[:, 3:], self.num_rows, "fnv", self.path, lines, CATEGORICAL_NAMES)
        batch = make_batch(dense, ids, self.keys)
        return LabeledBatch(batch, torch.from_numpy(labels[:, 0].astype(np.float32)))
