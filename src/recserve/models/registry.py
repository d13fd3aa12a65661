"""The eight DeepRecInfra models by name, in three presets, and how to build them.

``paper`` has the exact shapes of DeepRecSys's configs (see WORKLOADS.md); ``small`` keeps the
dense layers and pooling but divides rows by 1000 (a CPU-sized model); ``tiny`` shrinks
everything for tests. ``scale`` multiplies every table's rows (10x-100x makes tables exceed
GPU or host memory for the tiered-storage benchmarks).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from recserve.config import ModelConfig, SequenceConfig, TableConfig
from recserve.embedding.collection import BackendFactory
from recserve.models.base import RecModel
from recserve.models.dien import DIEN
from recserve.models.din import DIN
from recserve.models.dlrm import DLRM
from recserve.models.ncf import NCF
from recserve.models.wnd import MultiTaskWideAndDeep, WideAndDeep

PRESETS: tuple[str, ...] = ("paper", "small", "tiny")

_FAMILY_CLASSES: dict[str, type[RecModel]] = {
    "dlrm": DLRM,
    "wnd": WideAndDeep,
    "mtwnd": MultiTaskWideAndDeep,
    "ncf": NCF,
    "din": DIN,
    "dien": DIEN,
}


def _tables(prefix: str, count: int, rows: int, dim: int, lookups: int) -> list[TableConfig]:
    return [TableConfig(f"{prefix}{i}", rows, dim, lookups=lookups) for i in range(count)]


def _dlrm(
    name: str,
    preset: str,
    count: int,
    rows: int,
    dim: int,
    lookups: int,
    bottom: tuple[int, ...],
    top: tuple[int, ...],
    interaction: str,
) -> ModelConfig:
    if preset == "tiny":
        count, rows, dim, lookups = min(count, 4), 97, 8, min(lookups, 4)
        bottom, top = (16, 8), (0, 16, 1)
    tables = tuple(_tables("t", count, rows, dim, lookups))
    d = bottom[-1]
    width = d + (count + 1) * count // 2 if interaction == "dot" else d + count * dim
    return ModelConfig(
        name=name,
        family="dlrm",
        tables=tables,
        num_dense=bottom[0],
        bottom_mlp=bottom,
        top_mlp=(width, *top[1:]),
        interaction=interaction,  # type: ignore[arg-type]
    )


def _wnd(name: str, preset: str, tasks: int, interaction: str) -> ModelConfig:
    del interaction
    if name == "wnd":
        count, rows = 27, 1_000_000
        tables = _tables("t", count, rows, 32, 1)
        dense, top = 512, (1376, 1024, 512, 256, 1)
        if preset == "tiny":
            tables, dense = _tables("t", 3, 89, 8, 1), 16
            top = (16 + 3 * 8, 16, 1)
        return ModelConfig(name, "wnd", tuple(tables), num_dense=dense, top_mlp=top)
    tables = _tables("t", 41, 500_000, 32, 1) + _tables("big", 2, 5_000_000, 32, 1)
    dense, top, task = 512, (1888, 1024, 512), (512, 256, 128, 1)
    if preset == "tiny":
        tables = _tables("t", 3, 83, 8, 1) + _tables("big", 1, 101, 8, 1)
        dense, top, task = 16, (16 + 4 * 8, 16), (16, 8, 1)
    return ModelConfig(
        name, "mtwnd", tuple(tables), num_dense=dense, top_mlp=top, task_mlp=task, num_tasks=tasks
    )


def _ncf(name: str, preset: str, tasks: int, interaction: str) -> ModelConfig:
    rows, dim, mlp = (140_000, 140_000, 28_000, 28_000), 64, (128, 256, 256, 128, 64)
    if preset == "tiny":
        rows, dim, mlp = (61, 67, 71, 73), 8, (16, 16, 8)
    names = ("mf_user", "mf_item", "mlp_user", "mlp_item")
    tables = tuple(TableConfig(n, r, dim) for n, r in zip(names, rows, strict=True))
    return ModelConfig(name, "ncf", tables, top_mlp=mlp)


def _din(name: str, preset: str, tasks: int, interaction: str) -> ModelConfig:
    rows, dim, lookups, seq = (1_000_000, 100_000, 10_000_000, 10_000_000), 32, 3, 20
    att, top = (80, 40), (128, 200, 80, 2)
    if preset == "tiny":
        rows, dim, seq, att, top = (53, 59, 61, 67), 8, 5, (8, 4), (32, 8, 2)
    tables = tuple(
        TableConfig(n, r, dim, lookups=lookups, pooled=n != "behaviour")
        for n, r in zip(("user", "behaviour", "ad", "context"), rows, strict=True)
    )
    return ModelConfig(
        name,
        "din",
        tables,
        top_mlp=top,
        attention_mlp=att,
        sequences=(SequenceConfig("history", "behaviour", seq),),
    )


def _dien(name: str, preset: str, tasks: int, interaction: str) -> ModelConfig:
    count, rows, big, dim, seq, hidden = 41, 500_000, 5_000_000, 32, 40, 64
    top = (160, 200, 80, 2)
    if preset == "tiny":
        count, rows, big, dim, seq, hidden, top = 2, 47, 89, 8, 6, 8, (32, 8, 2)
    tables = [
        *_tables("c", count, rows, dim, 1),
        TableConfig("user", big, dim),
        TableConfig("item", big, dim),
    ]
    return ModelConfig(
        name,
        "dien",
        tuple(tables),
        top_mlp=top,
        gru_hidden=hidden,
        sequences=(SequenceConfig("history", "item", seq),),
    )


def _rmc(
    count: int, rows: int, dim: int, lookups: int, bottom: tuple[int, ...], top: tuple[int, ...]
):
    def build(name: str, preset: str, tasks: int, interaction: str) -> ModelConfig:
        return _dlrm(name, preset, count, rows, dim, lookups, bottom, top, interaction)

    return build


_BUILDERS: dict[str, Callable[[str, str, int, str], ModelConfig]] = {
    "dlrm-rmc1": _rmc(8, 4_000_000, 32, 80, (128, 64, 32), (288, 256, 64, 1)),
    "dlrm-rmc2": _rmc(32, 500_000, 64, 120, (256, 128, 64), (2112, 128, 64, 1)),
    "dlrm-rmc3": _rmc(10, 2_000_000, 32, 20, (2560, 1024, 256, 32), (352, 512, 256, 1)),
    "wnd": _wnd,
    "mt-wnd": _wnd,
    "ncf": _ncf,
    "din": _din,
    "dien": _dien,
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def get_config(
    name: str,
    preset: str = "paper",
    scale: float = 1.0,
    interaction: str = "cat",
    num_tasks: int = 3,
) -> ModelConfig:
    """The config of a registered model.

    ``interaction`` applies to the DLRM models (``cat``, as DeepRecSys's configs, or ``dot``,
    as the published DLRM); ``num_tasks`` to mt-wnd.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    if interaction not in ("cat", "dot"):
        raise ValueError(f"interaction must be 'cat' or 'dot', got {interaction!r}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    config = _BUILDERS[name](name, preset, num_tasks, interaction)
    if preset == "small":
        config = _scale_rows(config, 1e-3, minimum=1000)
    if scale != 1.0:
        config = _scale_rows(config, scale, minimum=1)
    return dataclasses.replace(config, scale=scale)


def _scale_rows(config: ModelConfig, factor: float, minimum: int) -> ModelConfig:
    tables = tuple(
        dataclasses.replace(t, num_rows=max(minimum, math.ceil(t.num_rows * factor)))
        for t in config.tables
    )
    return dataclasses.replace(config, tables=tables)


def model_class(config: ModelConfig) -> type[RecModel]:
    return _FAMILY_CLASSES[config.family]


def build_model(
    name_or_config: str | ModelConfig,
    preset: str = "paper",
    scale: float = 1.0,
    device: torch.device | str = "cpu",
    seed: int | None = 0,
    backend_factory: BackendFactory | None = None,
    **config_options: object,
) -> RecModel:
    """Build a model, initialised from ``seed`` (no initialisation when ``seed`` is None or the
    device is ``meta``), in eval mode."""
    if isinstance(name_or_config, ModelConfig):
        config = name_or_config
    else:
        config = get_config(name_or_config, preset, scale, **config_options)  # type: ignore[arg-type]
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    model = model_class(config)(config, device=device, backend_factory=backend_factory)
    if seed is not None and device.type != "meta":
        init_parameters(model, seed)
    return model.eval()


@torch.no_grad()
def init_parameters(model: RecModel, seed: int) -> None:
    """Deterministic initialisation: the same seed gives the same weights on any device."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.dense_modules():
        for p in module.parameters():
            fan_in = p.shape[1] if p.dim() > 1 else max(1, p.numel())
            bound = 1.0 / math.sqrt(fan_in)
            p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
    backend = model.sparse.backend
    reset = getattr(backend, "reset_parameters", None)
    if reset is not None:
        sparse_gen = torch.Generator(device=_device_of(backend)).manual_seed(seed + 1)
        reset(sparse_gen)


def _device_of(module: torch.nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Embedding and dense parameter counts and bytes, computed without allocating anything."""
    model = build_model(config, device="meta", seed=None)
    dense = model.dense_parameter_count()
    return {
        "embedding_rows": config.embedding_rows,
        "embedding_parameters": sum(t.num_rows * t.dim for t in config.tables),
        "embedding_bytes": config.embedding_bytes,
        "dense_parameters": dense,
        "dense_bytes": dense * 4,
    }
