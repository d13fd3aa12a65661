"""Checkpoints are read without running their code; the import CLI end to end."""

from __future__ import annotations

import json
import pathlib
from pathlib import Path

import pytest
import torch
from upstream_models import DlrmNet

from recserve.cli.main import main
from recserve.importers import import_checkpoint, load_pickle_checkpoint
from recserve.models import load_model


class _Payload:
    """Unpickling this (unsafely) would create a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (pathlib.Path.touch, (self.marker,))


def test_pickle_with_an_arbitrary_object_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    state = DlrmNet(2, [3], [2, 2], [3, 1]).state_dict()
    torch.save({"state_dict": state, "hook": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        import_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_pickle_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_unreadable_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        import_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        import_checkpoint(tmp_path / "junk.pt")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors"):
        import_checkpoint(tmp_path / "weights.npz")
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="neither"):
        import_checkpoint(tmp_path / "other.pt")


def test_import_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    net = DlrmNet(4, [6, 5], [3, 4], [4 + 3, 4, 1]).eval()
    torch.save({"state_dict": net.state_dict()}, tmp_path / "dlrm.pt")
    out = tmp_path / "imported"
    assert main(["import", str(tmp_path / "dlrm.pt"), str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "dlrm" and summary["max_abs_diff"] < 1e-6
    assert load_model(out).config.interaction == "dot"
    torch.save({"w": torch.zeros(1)}, tmp_path / "bad.pt")
    assert main(["import", str(tmp_path / "bad.pt"), str(tmp_path / "x")]) == 2
    assert "neither" in capsys.readouterr().err
