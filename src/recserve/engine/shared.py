"""One copy of the weights for every CPU worker, and staging buffers they all can read.

The parent saves the model once to a file and each worker maps it with
``torch.load(mmap=True)``: every process reads the same pages of the page cache (or of
``/dev/shm``), so resident memory does not grow with the number of workers
(:func:`process_memory` reports RSS and PSS to show it). A recserve model is saved as its
config (JSON) and its state dict, read back with ``weights_only=True`` (PyTorch's restricted
unpickler: tensors only) into a model rebuilt from the config. Any other ``nn.Module`` (a
user's own) is saved whole and read back unrestricted: the file is the engine's own, written a
moment before to a private (0600) temporary file and unlinked once the workers have it. Queries reach the workers through
:class:`StagingArena`, file-backed shared tensors with one slot per open query.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recserve.config import ModelConfig
from recserve.models.base import RecModel
from recserve.models.registry import build_model
from recserve.types import Batch, KeyedJagged


def pick_shared_dir(nbytes: int, preferred: str | None = None) -> Path:
    """``preferred`` if given, else ``/dev/shm`` when it has room for ``nbytes`` (with 25%
    to spare), else the temp folder (file-backed: slower to write, same once in page cache)."""
    if preferred:
        return Path(preferred)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 1.25 * nbytes:
        return shm
    return Path(tempfile.gettempdir())


def model_nbytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def save_shared_model(model: nn.Module, folder: Path) -> Path:
    """Write ``model`` (on the CPU) where workers can map it; returns the file (a recserve
    model also gets ``<file>.json``, its config)."""
    fd, name = tempfile.mkstemp(prefix="recserve-model-", suffix=".pt", dir=folder)
    os.close(fd)
    if isinstance(model, RecModel):
        torch.save(model.state_dict(), name)
        Path(name + ".json").write_text(json.dumps(model.config.to_dict()))
    else:
        torch.save(model, name)
    return Path(name)


def unlink_shared_model(path: Path) -> None:
    path.unlink(missing_ok=True)
    Path(str(path) + ".json").unlink(missing_ok=True)


def load_shared_model(path: str | Path) -> nn.Module:
    """Map a model saved by :func:`save_shared_model` (pages shared with every other mapper)."""
    config_file = Path(str(path) + ".json")
    if not config_file.is_file():  # a user's own module, saved whole by this engine
        whole: nn.Module = torch.load(path, mmap=True, weights_only=False)
        return whole.eval()
    config = ModelConfig.from_dict(json.loads(config_file.read_text()))
    model = build_model(config, seed=None)  # uninitialised storage, replaced just below
    state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    model.load_state_dict(state, assign=True)
    return model.eval()


def process_memory(pid: int) -> dict[str, int]:
    """Resident (``rss``), proportional (``pss``: shared pages divided among their users) and
    shared bytes of a process, from ``/proc/<pid>/smaps_rollup`` (Linux)."""
    fields = {"Rss": "rss", "Pss": "pss", "Shared_Clean": "shared", "Shared_Dirty": "shared"}
    out = {"rss": 0, "pss": 0, "shared": 0}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in fields:
                out[fields[key]] += int(rest.split()[0]) * 1024
    return out


@dataclass(frozen=True)
class ArenaSpec:
    """Where and how big the staging buffers are (picklable: sent to workers)."""

    folder: str
    tag: str
    slots: int
    max_items: int
    max_values: int
    num_features: int
    num_dense: int
    num_tasks: int

    def path(self, part: str) -> str:
        return os.path.join(self.folder, f"recserve-{self.tag}-{part}.bin")

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        slots: int,
        max_items: int,
        max_ids_per_item: int,
        folder: str = "",
    ) -> ArenaSpec:
        return cls(
            folder=folder,
            tag=f"{os.getpid()}-{os.urandom(4).hex()}",
            slots=slots,
            max_items=max_items,
            max_values=max_items * max_ids_per_item,
            num_features=len(config.feature_keys),
            num_dense=config.num_dense,
            num_tasks=config.num_tasks,
        )

    @property
    def nbytes(self) -> int:
        per_slot = (
            self.max_items * self.num_dense * 4
            + self.max_values * 8
            + (self.num_features * self.max_items + 1) * 8
            + self.max_items * self.num_tasks * 4
        )
        return self.slots * per_slot


class StagingArena:
    """Shared input and output buffers, ``slots`` of them, each room for one query.

    Slot ``s`` holds ``dense [max_items, n_dense]``, ``values [max_values]``, ``offsets
    [F*max_items + 1]`` (KeyedJagged layout for the query's B items) and ``out [max_items,
    tasks]``, which workers fill, rows ``[start, stop)`` at a time.
    """

    def __init__(self, spec: ArenaSpec) -> None:
        self.spec = spec
        s = spec
        self.dense = self._map("dense", torch.float32, (s.slots, s.max_items, s.num_dense))
        self.values = self._map("values", torch.int64, (s.slots, s.max_values))
        self.offsets = self._map(
            "offsets", torch.int64, (s.slots, s.num_features * s.max_items + 1)
        )
        self.out = self._map("out", torch.float32, (s.slots, s.max_items, s.num_tasks))

    def _map(self, part: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        if numel == 0:
            return torch.zeros(shape, dtype=dtype)
        return torch.from_file(self.spec.path(part), shared=True, size=numel, dtype=dtype).view(
            shape
        )

    def unlink(self) -> None:
        """Remove the files (mappings stay valid): nothing is left behind if a process dies."""
        for part in ("dense", "values", "offsets", "out"):
            Path(self.spec.path(part)).unlink(missing_ok=True)

    def stage(self, slot: int, batch: Batch, keys: tuple[str, ...]) -> int:
        """Copy a query into ``slot``; returns its number of ids."""
        sparse = batch.sparse if batch.sparse.keys == keys else batch.sparse.select(keys)
        if sparse.weights is not None:
            raise ValueError("the CPU worker pool does not take per-sample weights")
        b, n = batch.batch_size, sparse.values.numel()
        if b > self.spec.max_items:
            raise ValueError(f"query of {b} items is over the staging limit {self.spec.max_items}")
        if n > self.spec.max_values:
            raise ValueError(
                f"query has {n} ids, over the staging room of {self.spec.max_values} "
                "(raise EngineConfig.max_ids_per_item)"
            )
        self.dense[slot, :b].copy_(batch.dense)
        self.values[slot, :n].copy_(sparse.values)
        self.offsets[slot, : len(keys) * b + 1].copy_(sparse.offsets)
        return n

    def batch(self, slot: int, batch_size: int, num_values: int, keys: tuple[str, ...]) -> Batch:
        """A view of the query staged in ``slot`` (no copy)."""
        b = batch_size
        sparse = KeyedJagged(
            keys,
            self.values[slot, :num_values],
            self.offsets[slot, : len(keys) * b + 1],
            b,
        )
        return Batch(self.dense[slot, :b], sparse)


def wait_for_child(conn: Any, proc: Any, timeout_s: float, what: str) -> Any:
    """The payload of a child process's ``("ready", payload)`` message on ``conn``;
    ``RuntimeError`` naming ``what`` when it fails, exits or is silent for ``timeout_s``."""
    if not conn.poll(timeout_s):
        raise RuntimeError(f"{what} did not start within {timeout_s:.0f} s")
    try:
        kind, payload = conn.recv()
    except EOFError:
        kind, payload = "error", f"exited during start-up (code {proc.exitcode})"
    if kind != "ready":
        raise RuntimeError(f"{what} failed to start: {payload}")
    return payload
