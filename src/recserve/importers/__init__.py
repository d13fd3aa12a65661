"""Import models trained elsewhere into recserve model folders.

Supported sources: facebookresearch/dlrm ``DLRM_Net`` checkpoints (:mod:`.dlrm`) and TorchRec
``DLRM`` state dicts with their EmbeddingBagCollection (:mod:`.torchrec`), from
``.safetensors`` or ``torch.save`` files read with the restricted unpickler
(:mod:`.checkpoint`). Every import can be checked against the source model's own forward
(written from upstream's code, run on the source tensors): :func:`max_difference`.

```python
from recserve.importers import import_checkpoint, max_difference
result = import_checkpoint("dlrm.pt")               # format detected from the tensor names
assert max_difference(result) < 1e-5
save_model(result.model, "models/dlrm-imported")    # config.json + model.safetensors
```
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from recserve.config import Interaction
from recserve.importers.assemble import ImportResult, max_difference, pair_permutation
from recserve.importers.checkpoint import SourceState, load_pickle_checkpoint, load_source_state
from recserve.importers.dlrm import import_dlrm_state, is_dlrm_state
from recserve.importers.torchrec import import_torchrec_state, is_torchrec_state

SourceFormat = Literal["auto", "dlrm", "torchrec"]
FORMATS: tuple[str, ...] = ("auto", "dlrm", "torchrec")


def detect_format(source: SourceState) -> str:
    if is_torchrec_state(source.tensors):
        return "torchrec"
    if is_dlrm_state(source.tensors):
        return "dlrm"
    sample = sorted(source.tensors)[:5]
    raise ValueError(
        f"{source.path}: neither a facebookresearch/dlrm checkpoint (emb_l.*, bot_l.*, top_l.*) "
        f"nor a TorchRec DLRM state dict (sparse_arch.embedding_bag_collection.*); "
        f"its tensors start {sample}"
    )


def import_checkpoint(
    path: str | Path,
    format: SourceFormat = "auto",
    interaction: Interaction | None = None,
    features: Sequence[tuple[str, str]] | None = None,
    tables: Sequence[str] | None = None,
    name: str | None = None,
) -> ImportResult:
    """A recserve model from a checkpoint file.

    ``interaction`` (dlrm only) settles a top-MLP width that fits both dot and cat;
    ``features`` and ``tables`` (TorchRec only) give the feature-to-table map and table order.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    source = load_source_state(path)
    kind = detect_format(source) if format == "auto" else format
    default_name = Path(path).stem.replace(".", "-") or "imported"
    if kind == "dlrm":
        if features is not None or tables is not None:
            raise ValueError("features and tables apply to TorchRec checkpoints only")
        return import_dlrm_state(source, interaction, name or default_name)
    if interaction not in (None, "dot"):
        raise ValueError("TorchRec's DLRM uses the dot interaction")
    return import_torchrec_state(source, features, tables, name or default_name)


__all__ = [
    "FORMATS",
    "ImportResult",
    "SourceState",
    "detect_format",
    "import_checkpoint",
    "load_pickle_checkpoint",
    "load_source_state",
    "max_difference",
    "pair_permutation",
]
