"""Typed configuration: tables, sequence features, models.

Every model is described by a :class:`ModelConfig`; presets (``paper``, ``small``, ``tiny``) are
built in :mod:`recserve.models.registry`, and users can write their own variants as YAML or JSON
(:func:`load_model_config`). Sizes are computed from configs without allocating anything.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

Pooling = Literal["sum", "mean"]
RowDType = Literal["fp32", "fp16", "bf16", "int8"]
Placement = Literal["auto", "hbm", "host", "host+cache", "ssd"]
Interaction = Literal["dot", "cat"]

POOLINGS: tuple[str, ...] = ("sum", "mean")
ROW_DTYPES: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")
PLACEMENTS: tuple[str, ...] = ("auto", "hbm", "host", "host+cache", "ssd")
FAMILIES: tuple[str, ...] = ("dlrm", "wnd", "mtwnd", "ncf", "din", "dien")

TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "int8": torch.uint8,
}


def row_bytes(dim: int, dtype: str) -> int:
    """Bytes one row of ``dim`` elements takes; int8 rows carry an fp32 scale and bias (8 bytes)."""
    if dtype == "int8":
        return dim + 8
    return dim * TORCH_DTYPES[dtype].itemsize


@dataclass(frozen=True)
class TableConfig:
    """One embedding table and the pooled feature that reads it."""

    name: str
    """Table name; also the feature key in requests (one pooled feature per table)."""
    num_rows: int
    """Rows in the table (ids are in ``[0, num_rows)``)."""
    dim: int
    """Embedding dimension D."""
    pooling: Pooling = "sum"
    """How the rows of one bag are combined."""
    lookups: int = 1
    """Typical ids per item (the pooling factor L); used by synthetic queries and planners."""
    dtype: RowDType = "fp32"
    """Storage type of rows; int8 is row-wise quantised with per-row scale and bias."""
    placement: Placement = "auto"
    """Where rows live; ``auto`` lets the planner decide."""
    pooled: bool = True
    """Whether requests carry a pooled feature for this table (False: read only by sequences)."""

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"table name {self.name!r} must be alphanumeric (with '_' or '-')")
        if self.num_rows <= 0:
            raise ValueError(f"table {self.name!r}: num_rows must be positive, got {self.num_rows}")
        if self.dim <= 0:
            raise ValueError(f"table {self.name!r}: dim must be positive, got {self.dim}")
        if self.lookups < 0:
            raise ValueError(f"table {self.name!r}: lookups must be >= 0, got {self.lookups}")
        _check_choice(f"table {self.name!r} pooling", self.pooling, POOLINGS)
        _check_choice(f"table {self.name!r} dtype", self.dtype, ROW_DTYPES)
        _check_choice(f"table {self.name!r} placement", self.placement, PLACEMENTS)

    @property
    def nbytes(self) -> int:
        return self.num_rows * row_bytes(self.dim, self.dtype)


@dataclass(frozen=True)
class SequenceConfig:
    """A behaviour sequence: ids of past items looked up (not pooled) in an existing table."""

    name: str
    """Feature key in requests."""
    table: str
    """Name of the table the ids index."""
    max_len: int
    """Longest sequence accepted; shorter ones are padded and masked."""

    def __post_init__(self) -> None:
        if self.max_len <= 0:
            raise ValueError(f"sequence {self.name!r}: max_len must be positive")


@dataclass(frozen=True)
class ModelConfig:
    """A whole recommendation model: its family, tables and dense layers."""

    name: str
    """Model name, e.g. ``dlrm-rmc1``."""
    family: str
    """One of :data:`FAMILIES`; selects the architecture."""
    tables: tuple[TableConfig, ...]
    """Embedding tables, in the order their pooled outputs are concatenated."""
    num_dense: int = 0
    """Width of the dense feature vector per item (0 when the model takes none)."""
    bottom_mlp: tuple[int, ...] = ()
    """Hidden/output widths of the dense (bottom) MLP; its input is ``num_dense``."""
    top_mlp: tuple[int, ...] = ()
    """Widths of the over (top) MLP after its input (the last is the number of logits)."""
    interaction: Interaction = "cat"
    """DLRM feature interaction: ``dot`` (pairwise dot products) or ``cat`` (concatenation)."""
    num_tasks: int = 1
    """Output columns (probabilities); multi-task models have one head per task."""
    task_mlp: tuple[int, ...] = ()
    """Per-task head widths (multi-task Wide&Deep)."""
    sequences: tuple[SequenceConfig, ...] = ()
    """Behaviour sequences (DIN, DIEN)."""
    attention_mlp: tuple[int, ...] = ()
    """Hidden widths of the attention unit (DIN, DIEN); its output is one score."""
    gru_hidden: int = 0
    """Hidden width of the GRU and AUGRU (DIEN)."""
    scale: float = 1.0
    """Multiplier applied to every table's rows when this config was built."""

    def __post_init__(self) -> None:
        _check_choice(f"model {self.name!r} family", self.family, FAMILIES)
        _check_choice(f"model {self.name!r} interaction", self.interaction, ("dot", "cat"))
        names = [t.name for t in self.tables] + [s.name for s in self.sequences]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"model {self.name!r}: duplicate feature names {sorted(dup)}")
        table_names = {t.name for t in self.tables}
        if not any(t.pooled for t in self.tables):
            raise ValueError(f"model {self.name!r}: at least one table must be pooled")
        for s in self.sequences:
            if s.table not in table_names:
                raise ValueError(f"sequence {s.name!r} refers to unknown table {s.table!r}")
        if self.num_tasks < 1:
            raise ValueError(f"model {self.name!r}: num_tasks must be >= 1")

    @property
    def feature_keys(self) -> tuple[str, ...]:
        """Keys of a request's sparse features: pooled tables, then sequences, in config order."""
        return tuple(t.name for t in self.tables if t.pooled) + tuple(
            s.name for s in self.sequences
        )

    @property
    def pooled_tables(self) -> tuple[TableConfig, ...]:
        return tuple(t for t in self.tables if t.pooled)

    @property
    def embedding_bytes(self) -> int:
        return sum(t.nbytes for t in self.tables)

    @property
    def embedding_rows(self) -> int:
        return sum(t.num_rows for t in self.tables)

    def table(self, name: str) -> TableConfig:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    def with_tables(self, **changes: Any) -> ModelConfig:
        """The same model with every table's fields changed (e.g. ``dtype="fp16"``)."""
        tables = tuple(dataclasses.replace(t, **changes) for t in self.tables)
        return dataclasses.replace(self, tables=tables)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        tables = tuple(_from_fields(TableConfig, t) for t in data.pop("tables", ()))
        seqs = tuple(_from_fields(SequenceConfig, s) for s in data.pop("sequences", ()))
        for key in ("bottom_mlp", "top_mlp", "task_mlp", "attention_mlp"):
            if key in data:
                data[key] = tuple(int(x) for x in data[key])
        return cls(tables=tables, sequences=seqs, **data)


def _from_fields(cls: Any, data: dict[str, Any]) -> Any:
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**data)


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {list(choices)}, got {value!r}")


def load_model_config(path: str | Path) -> ModelConfig:
    """Read a model config from a ``.yaml``/``.yml`` or ``.json`` file.

    A file may either spell out the whole model, or start from a preset and override fields::

        base: dlrm-rmc1        # a registered model name
        preset: small          # optional, default "paper"
        interaction: dot
        table_overrides: {dtype: fp16}
    """
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    elif path.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"{path}: config files must end in .yaml, .yml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    if "base" in data:
        from recserve.models.registry import get_config

        data = dict(data)
        base = get_config(
            data.pop("base"), preset=data.pop("preset", "paper"), scale=data.pop("scale", 1.0)
        )
        overrides = data.pop("table_overrides", {})
        if overrides:
            base = base.with_tables(**overrides)
        for key in ("bottom_mlp", "top_mlp", "task_mlp", "attention_mlp"):
            if key in data:
                data[key] = tuple(int(x) for x in data[key])
        return dataclasses.replace(base, **data)
    return ModelConfig.from_dict(data)


def save_model_config(config: ModelConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config.to_dict(), indent=2))


@dataclass
class RunConfig:
    """Options of a synthetic run (``recserve run``)."""

    batch: int = 256
    """Items per query."""
    iters: int = 50
    """Timed queries."""
    warmup: int = 5
    """Untimed queries first."""
    device: str = "auto"
    """``cpu``, ``cuda`` or ``auto`` (CUDA when there is one)."""
    seed: int = 0
    ids: str = "zipf:1.05"
    """Id distribution: ``uniform``, ``zipf:<alpha>`` or ``one-item``."""
    extra: dict[str, Any] = field(default_factory=dict)
