"""What every dataset reader shares: the labelled batch type, file errors, line chunking,
stable hashing of categorical tokens, the count transform, and DLRM config building.

Readers stream a file a chunk of lines at a time (never the whole file) and turn each chunk
into a :class:`LabeledBatch`: a recserve request (:class:`~recserve.types.Batch`: dense
``[B, n_dense]`` float32 + one id per item per pooled table in the KeyedJagged layout, keys =
``config.feature_keys``) and the labels ``[B]`` float32.

Hashing. Categorical tokens become row ids with a *stable* hash (the same id on every machine,
Python version and run, unlike Python's salted ``hash()``):

- ``fnv``: 64-bit FNV-1a over the token's Unicode code points (one step per code point; for
  ASCII tokens this is exactly FNV-1a-64 of the bytes), then ``% num_rows``. The empty token
  (a missing value) hashes like any other token, so "missing" gets a row of its own.
- ``hex``: the token read as a hexadecimal number, then ``% num_rows``; the empty token is 0.
  This is TorchRec's Criteo preprocessing (``int(token or "0", 16) % num_embeddings``), so a
  model trained by TorchRec on Criteo and imported into recserve gets the ids it was trained on.

Counts. Integer count features become ``log(1 + max(x, 0))`` (DLRM's and TorchRec's Criteo
transform: negatives clipped to 0, missing values 0).
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch

from recserve.config import Interaction, ModelConfig, TableConfig
from recserve.types import Batch, KeyedJagged

HashKind = Literal["fnv", "hex"]
HASH_KINDS: tuple[str, ...] = ("fnv", "hex")

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)


class DataFileError(ValueError):
    """A data file that cannot be read or parsed; the message names the file and line."""

    def __init__(self, path: str | Path, message: str, line: int | None = None) -> None:
        where = f"{path}" if line is None else f"{path}, line {line}"
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line


@dataclass
class LabeledBatch:
    """A request and its labels: ``batch`` (B items) and ``labels [B]`` float32."""

    batch: Batch
    labels: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.batch.batch_size


def open_binary(path: str | Path) -> BinaryIO:
    """Open a data file for reading (``.gz`` transparently) or raise :class:`DataFileError`."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            return gzip.open(path, "rb")  # type: ignore[return-value]
        return open(path, "rb")
    except OSError as err:
        raise DataFileError(path, f"cannot open: {err.strerror or err}") from err


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line_number, text)`` of every line (1-based, line ending removed), decoded as UTF-8.

    Raises :class:`DataFileError` for a missing or unreadable file and for bytes that are not
    UTF-8 (naming the line).
    """
    number = 0
    with open_binary(path) as f:
        try:
            for number, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataFileError(path, f"not UTF-8 text ({err.reason})", number) from err
                yield number, text.rstrip("\r\n")
        except (OSError, EOFError, gzip.BadGzipFile) as err:
            raise DataFileError(path, f"cannot read: {err}", number + 1) from err


def iter_line_chunks(
    path: str | Path,
    num_columns: int,
    delimiter: str,
    chunk_size: int,
    skip_first: bool = False,
) -> Iterator[tuple[list[int], list[list[str]]]]:
    """Split lines into fields, ``chunk_size`` lines at a time.

    Yields ``(line_numbers, rows)`` with 1-based line numbers; empty lines are skipped, every
    other line must have exactly ``num_columns`` fields. Raises :class:`DataFileError` for a
    wrong column count, an unreadable or non-UTF-8 file.
    """
    if chunk_size <= 0:
        raise ValueError(f"batch size must be positive, got {chunk_size}")
    lines: list[int] = []
    rows: list[list[str]] = []
    for number, line in iter_lines(path):
        if (number == 1 and skip_first) or not line:
            continue
        fields = line.split(delimiter)
        if len(fields) != num_columns:
            raise DataFileError(
                path, f"expected {num_columns} columns, found {len(fields)}", number
            )
        lines.append(number)
        rows.append(fields)
        if len(rows) == chunk_size:
            yield lines, rows
            lines, rows = [], []
    if rows:
        yield lines, rows


def first_line(path: str | Path) -> str:
    """The first line of a file ('' for an empty file), for header and delimiter sniffing."""
    for _, line in iter_lines(path):
        return line
    return ""


def is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def parse_floats(
    column: np.ndarray,
    path: str | Path,
    lines: Sequence[int],
    names: Sequence[str],
    empty: float | None = 0.0,
) -> np.ndarray:
    """Parse a ``[B, C]`` array of numeric strings as float64.

    Empty fields become ``empty`` (or are an error when ``empty`` is None). A non-numeric or
    non-finite field raises :class:`DataFileError` naming the line and column.
    """
    if empty is not None:
        column = np.where(column == "", str(empty), column)
    try:
        out = column.astype(np.float64)
    except ValueError:
        out = None
    if out is not None and np.isfinite(out).all():
        return out
    for r, row in enumerate(column):
        for c, token in enumerate(row):
            try:
                ok = np.isfinite(float(token))
            except ValueError:
                ok = False
            if not ok:
                raise DataFileError(
                    path, f"column {names[c]!r}: expected a number, found {str(token)!r}", lines[r]
                )
    raise AssertionError("unreachable")  # pragma: no cover


def log_counts(counts: np.ndarray) -> np.ndarray:
    """``log(1 + max(x, 0))`` of integer count features, as float32."""
    return np.log1p(np.maximum(counts, 0.0)).astype(np.float32)


def _code_points(tokens: np.ndarray) -> np.ndarray:
    """``[..., W]`` uint32 code points of a unicode array (0 past each token's end)."""
    tokens = np.ascontiguousarray(tokens, dtype=np.str_)
    width = max(1, tokens.dtype.itemsize // 4)
    if tokens.dtype.itemsize == 0:
        return np.zeros((*tokens.shape, 1), dtype=np.uint32)
    return tokens.view(np.uint32).reshape(*tokens.shape, width)


def fnv1a64(tokens: np.ndarray | Sequence[str]) -> np.ndarray:
    """64-bit FNV-1a of each token's code points, vectorised; returns uint64 of the same shape.

    ``h = 0xcbf29ce484222325; for each code point c: h = (h ^ c) * 0x100000001b3 (mod 2^64)``.
    """
    cps = _code_points(np.asarray(tokens, dtype=np.str_))
    h = np.full(cps.shape[:-1], FNV_OFFSET, dtype=np.uint64)
    for k in range(cps.shape[-1]):
        c = cps[..., k].astype(np.uint64)
        h = np.where(c != 0, (h ^ c) * FNV_PRIME, h)
    return h


_HEX_DIGITS = np.full(128, 255, dtype=np.uint64)
for _i, _ch in enumerate("0123456789abcdef"):
    _HEX_DIGITS[ord(_ch)] = _i
    _HEX_DIGITS[ord(_ch.upper())] = _i


def parse_hex(
    tokens: np.ndarray, path: str | Path, lines: Sequence[int], names: Sequence[str]
) -> np.ndarray:
    """``[B, C]`` hexadecimal tokens (at most 16 digits, empty = 0) as uint64."""
    cps = _code_points(tokens)
    if cps.shape[-1] > 16:
        bad = np.argwhere(np.char.str_len(tokens) > 16)[0]
        raise DataFileError(
            path,
            f"column {names[bad[1]]!r}: {str(tokens[bad[0], bad[1]])!r} is longer than 16 hex digits",
            lines[bad[0]],
        )
    digits = np.where(cps < 128, _HEX_DIGITS[np.minimum(cps, 127)], np.uint64(255))
    invalid = (digits == 255) & (cps != 0)
    if invalid.any():
        r, c = np.argwhere(invalid.any(axis=-1))[0]
        raise DataFileError(
            path,
            f"column {names[c]!r}: expected hexadecimal, found {str(tokens[r, c])!r}",
            lines[r],
        )
    value = np.zeros(cps.shape[:-1], dtype=np.uint64)
    for k in range(cps.shape[-1]):
        value = np.where(cps[..., k] != 0, (value << np.uint64(4)) | digits[..., k], value)
    return value


def hash_columns(
    tokens: np.ndarray,
    num_rows: Sequence[int],
    kind: HashKind,
    path: str | Path,
    lines: Sequence[int],
    names: Sequence[str],
) -> np.ndarray:
    """Row ids ``[B, C]`` int64 of categorical tokens ``[B, C]``, column c hashed into
    ``num_rows[c]`` rows with ``kind`` (see the module docstring)."""
    if kind == "fnv":
        h = fnv1a64(tokens)
    elif kind == "hex":
        h = parse_hex(tokens, path, lines, names)
    else:
        raise ValueError(f"hash must be one of {list(HASH_KINDS)}, got {kind!r}")
    rows = np.asarray(num_rows, dtype=np.uint64)
    return (h % rows).astype(np.int64)


def make_batch(
    dense: np.ndarray | torch.Tensor, ids: np.ndarray | torch.Tensor, keys: Sequence[str]
) -> Batch:
    """A request with one id per item per feature: ``dense [B, n_dense]``, ``ids [B, F]``."""
    dense_t = torch.as_tensor(dense, dtype=torch.float32)
    ids_t = torch.as_tensor(ids, dtype=torch.int64)
    b, f = ids_t.shape
    if f != len(keys):
        raise ValueError(f"ids have {f} columns for {len(keys)} feature keys")
    values = ids_t.t().reshape(-1).contiguous()
    sparse = KeyedJagged.from_lengths(keys, values, torch.ones(f * b, dtype=torch.int64))
    return Batch(dense_t.reshape(b, -1).contiguous(), sparse)


def check_tabular_config(config: ModelConfig, num_dense: int, num_tables: int, what: str) -> None:
    """A config a reader can feed: ``num_dense`` dense features, ``num_tables`` pooled tables
    (one id each), no behaviour sequences."""
    if config.num_dense != num_dense or len(config.pooled_tables) != num_tables:
        raise ValueError(
            f"{what} feeds {num_dense} dense features and {num_tables} pooled tables; model "
            f"{config.name!r} has {config.num_dense} dense and {len(config.pooled_tables)} tables"
        )
    if config.sequences:
        raise ValueError(f"{what} has no behaviour sequences; model {config.name!r} expects some")


def dlrm_config(
    name: str,
    num_dense: int,
    table_names: Sequence[str],
    rows_per_table: int | Sequence[int],
    dim: int = 16,
    bottom_hidden: Sequence[int] = (64,),
    top_hidden: Sequence[int] = (64,),
    interaction: Interaction = "dot",
) -> ModelConfig:
    """A DLRM over ``num_dense`` dense features and one L=1 table per name.

    Bottom MLP ``(num_dense, *bottom_hidden, dim)``; top MLP ``(width, *top_hidden, 1)`` where
    ``width`` is the interaction's output (``dim + T(T+1)/2`` for dot, ``dim + T·dim`` for cat).
    """
    rows = (
        [int(rows_per_table)] * len(table_names)
        if isinstance(rows_per_table, int)
        else [int(r) for r in rows_per_table]
    )
    if len(rows) != len(table_names):
        raise ValueError(f"{len(rows)} row counts for {len(table_names)} tables")
    tables = tuple(TableConfig(n, r, dim) for n, r in zip(table_names, rows, strict=True))
    t = len(tables)
    width = dim + t * (t + 1) // 2 if interaction == "dot" else dim + t * dim
    return ModelConfig(
        name=name,
        family="dlrm",
        tables=tables,
        num_dense=num_dense,
        bottom_mlp=(num_dense, *bottom_hidden, dim),
        top_mlp=(width, *top_hidden, 1),
        interaction=interaction,
    )
