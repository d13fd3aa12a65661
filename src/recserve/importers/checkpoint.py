"""Reading other systems' checkpoints without running their code.

Accepted files:

- ``.safetensors``: tensors only, nothing to unpickle.
- ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` (``torch.save`` pickles): read only with
  ``torch.load(path, weights_only=True, map_location="cpu")``, PyTorch's restricted unpickler,
  which builds tensors, numbers, strings and plain containers and refuses any other object.
  The one addition to its allow-list is numpy's scalar and numeric dtype constructors (they
  build numbers from bytes; facebookresearch/dlrm stores its accuracy and loss as numpy scalars
  beside the weights). A refusal surfaces as ``ValueError("refusing to unpickle ...")``.

A checkpoint may be a bare state dict or a dict holding one under ``state_dict``,
``model_state_dict``, ``model`` or ``module`` (training scripts add epochs, losses and
optimiser state beside it; those are ignored).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_DICT_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model", "module")
PICKLE_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


@dataclass
class SourceState:
    """Tensors of a source model by name, and whether their order is the file's own."""

    tensors: dict[str, torch.Tensor]
    ordered: bool
    """True for ``torch.save`` files (a state dict keeps module registration order); False
    for safetensors, whose key order is not the model's."""
    path: str


def _numpy_globals() -> list[Any]:
    """numpy's scalar and dtype constructors, under their numpy 1.x and 2.x module names."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    scalar = multiarray.scalar  # type: ignore[attr-defined]
    dtypes = {type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"}  # numeric kinds only
    return [
        scalar,
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *sorted(dtypes, key=str),
    ]


def load_pickle_checkpoint(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True`` (plus numpy scalars); refuses other objects."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        detail = str(err).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0]
        raise ValueError(
            f"refusing to unpickle {path}: it holds objects other than tensors, numbers and "
            f"plain containers, and loading them could run arbitrary code ({detail}). "
            "Convert it to .safetensors or a plain state dict where it was made."
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable torch checkpoint ({err})") from err


def load_source_state(path: str | Path) -> SourceState:
    """All tensors of a checkpoint (see the module docstring for what is accepted)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
        return SourceState(dict(tensors), ordered=False, path=str(path))
    if path.suffix not in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path}: expected a .safetensors file or a torch.save checkpoint "
            f"({', '.join(PICKLE_SUFFIXES)})"
        )
    obj = load_pickle_checkpoint(path)
    state = _find_state_dict(obj)
    if state is None:
        raise ValueError(f"{path}: no state dict of tensors found in the checkpoint")
    return SourceState(state, ordered=True, path=str(path))


def _find_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if not isinstance(obj, Mapping):
        return None
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if tensors and len(tensors) >= len(obj) / 2:
        return tensors
    for key in STATE_DICT_KEYS:
        inner = _find_state_dict(obj.get(key))
        if inner is not None:
            return inner
    return None


def strip_prefix(tensors: dict[str, torch.Tensor], marker: str) -> dict[str, torch.Tensor]:
    """Drop the wrapper prefix (``module.``, ``model.``, ...) that precedes ``marker`` in the
    first key holding it, from every key that has that prefix; other keys are kept as they are."""
    for key in tensors:
        at = key.find(marker)
        if at >= 0:
            prefix = key[:at]
            break
    else:
        return tensors
    if not prefix:
        return tensors
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in tensors.items()}


def natural_key(name: str) -> list[Any]:
    """Sort key that orders ``t_cat_2`` before ``t_cat_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def numbered(tensors: Mapping[str, torch.Tensor], pattern: str) -> dict[int, torch.Tensor]:
    """``{i: tensor}`` for the keys matching ``pattern`` (a regex with one ``(\\d+)`` group)."""
    out: dict[int, torch.Tensor] = {}
    regex = re.compile(pattern)
    for key, value in tensors.items():
        m = regex.fullmatch(key)
        if m:
            out[int(m.group(1))] = value
    return dict(sorted(out.items()))
