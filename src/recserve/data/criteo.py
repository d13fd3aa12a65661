"""Criteo display-advertising data (Kaggle DAC ``train.txt``, Criteo 1TB day files).

Format: one example per line, 40 tab-separated fields, no header::

    label  I1 … I13  C1 … C26

``label`` is 0/1; ``I1..I13`` are integer counts (may be empty or negative); ``C1..C26`` are
32-bit hashes written as 8 hex digits (may be empty). The DeepCTR sample variant (comma
separated, a ``label,I1,…`` header, counts written as floats like ``260.0``) is read too: the
delimiter and header are detected from the first line.

Preprocessing (the DLRM / TorchRec standard): dense = ``log(1 + max(I, 0))`` with empty = 0;
each ``C`` column hashed into its table's rows (``hex``: ``int(C, 16) % rows``, TorchRec's
choice and the default; ``fnv``: FNV-1a-64 of the token ``% rows``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from recserve.config import Interaction, ModelConfig
from recserve.data.common import (
    HASH_KINDS,
    DataFileError,
    HashKind,
    LabeledBatch,
    check_tabular_config,
    dlrm_config,
    first_line,
    hash_columns,
    is_number,
    iter_line_chunks,
    log_counts,
    make_batch,
    parse_floats,
)

NUM_DENSE = 13
NUM_CATEGORICAL = 26
NUM_COLUMNS = 1 + NUM_DENSE + NUM_CATEGORICAL
DENSE_NAMES: tuple[str, ...] = tuple(f"I{i}" for i in range(1, NUM_DENSE + 1))
CATEGORICAL_NAMES: tuple[str, ...] = tuple(f"C{i}" for i in range(1, NUM_CATEGORICAL + 1))


def criteo_dlrm_config(
    rows_per_table: int | Sequence[int] = 10_000,
    dim: int = 16,
    bottom_hidden: Sequence[int] = (64,),
    top_hidden: Sequence[int] = (64,),
    interaction: Interaction = "dot",
    name: str = "criteo-dlrm",
) -> ModelConfig:
    """A DLRM for Criteo: 13 dense features, 26 tables ``C1..C26`` of L=1, ``dim``-wide rows.

    Bottom MLP ``13-*bottom_hidden-dim``; top MLP ``width-*top_hidden-1`` (``width = dim + 351``
    for the dot interaction, ``27·dim`` for cat).
    """
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


class CriteoReader:
    """Stream a Criteo file as labelled recserve requests of ``batch_size`` items.

    ``config`` is the model fed (13 dense features, 26 pooled tables in ``C1..C26`` order; its
    table names are the request's keys, its row counts the hash ranges); by default
    :func:`criteo_dlrm_config`. Iterating reads the file again from the start.
    """

    def __init__(
        self,
        path: str | Path,
        config: ModelConfig | None = None,
        batch_size: int = 1024,
        hash: HashKind = "hex",
        delimiter: str | None = None,
        header: bool | None = None,
    ) -> None:
        self.path = Path(path)
        self.config = config if config is not None else criteo_dlrm_config()
        check_tabular_config(self.config, NUM_DENSE, NUM_CATEGORICAL, "a Criteo reader")
        if hash not in HASH_KINDS:
            raise ValueError(f"hash must be one of {list(HASH_KINDS)}, got {hash!r}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.hash: HashKind = hash
        self._delimiter = delimiter
        self._header = header
        self.keys = self.config.feature_keys
        self.num_rows = [t.num_rows for t in self.config.pooled_tables]

    def _sniff(self) -> tuple[str, bool]:
        line = first_line(self.path)
        delimiter = self._delimiter or ("\t" if "\t" in line or "," not in line else ",")
        header = self._header
        if header is None:
            first = line.split(delimiter, 1)[0]
            header = bool(line) and not is_number(first) and first != ""
        return delimiter, header

    def __iter__(self) -> Iterator[LabeledBatch]:
        delimiter, header = self._sniff()
        chunks = iter_line_chunks(
            self.path, NUM_COLUMNS, delimiter, self.batch_size, skip_first=header
        )
        for lines, rows in chunks:
            yield self.parse(rows, lines)

    def parse(self, rows: Sequence[Sequence[str]], lines: Sequence[int]) -> LabeledBatch:
        """One batch from split lines (``rows [B][40]`` strings, ``lines`` their numbers)."""
        fields = np.array(rows, dtype=np.str_)
        labels = parse_floats(fields[:, :1], self.path, lines, ("label",), empty=None)
        if ((labels != 0) & (labels != 1)).any():
            r = int(np.argwhere((labels != 0) & (labels != 1))[0, 0])
            raise DataFileError(self.path, f"label must be 0 or 1, found {rows[r][0]!r}", lines[r])
        counts = parse_floats(fields[:, 1 : 1 + NUM_DENSE], self.path, lines, DENSE_NAMES)
        ids = hash_columns(
            fields[:, 1 + NUM_DENSE :],
            self.num_rows,
            self.hash,
            self.path,
            lines,
            CATEGORICAL_NAMES,
        )
        batch = make_batch(log_counts(counts), ids, self.keys)
        return LabeledBatch(batch, torch.from_numpy(labels[:, 0].astype(np.float32)))
