"""The kernels compiled for a real GPU (skipped without CUDA).

Run on a GPU machine with the interpreter off: ``TRITON_INTERPRET=0 pytest -m gpu tests/kernels``.
"""

from __future__ import annotations

import pytest
import torch

from recserve.config import TableConfig
from recserve.embedding.backend import TorchBackend
from recserve.kernels.bench.checks import run_checks
from recserve.storage.hbm import TritonBackend
from recserve.types import KeyedJagged

pytestmark = pytest.mark.gpu


def test_every_variant_matches_its_reference() -> None:
    failed = [c for c in run_checks("cuda", seed=1) if not c["ok"]]
    assert not failed, failed[:5]


def test_backend_on_cuda_matches_torch_backend() -> None:
    tables = (
        TableConfig("a", 100_000, 64, dtype="fp32"),
        TableConfig("b", 50_000, 96, "mean", dtype="fp16"),
        TableConfig("c", 70_000, 32, dtype="int8"),
    )
    ref = TorchBackend(tables, "cuda")
    ref.reset_parameters()
    tri = TritonBackend.from_backend(ref)
    b = 512
    lengths = torch.randint(0, 40, (len(tables) * b,), device="cuda")
    values = torch.cat(
        [
            torch.randint(0, tables[i // b].num_rows, (int(n),), device="cuda")
            for i, n in enumerate(lengths)
        ]
    )
    kj = KeyedJagged.from_lengths([t.name for t in tables], values, lengths)
    out = tri.pooled(kj.values, kj.offsets, b)
    torch.testing.assert_close(out, ref.pooled(kj.values, kj.offsets, b), rtol=1e-4, atol=1e-5)


def test_autotune_records_a_config() -> None:
    tables = (TableConfig("a", 200_000, 64), TableConfig("b", 100_000, 64))
    tri = TritonBackend(tables, "cuda")
    tri.tuner.entries.clear()
    b = 1024
    offsets = torch.arange(0, 2 * b * 20 + 1, 20, device="cuda")
    batches = [
        (
            torch.cat([torch.randint(0, t.num_rows, (b * 20,), device="cuda") for t in tables]),
            offsets,
        )
        for _ in range(2)
    ]
    entries = tri.autotune(batches, b, candidates=4)
    assert len(entries) == 1 and entries[0].us > 0
    bucket, config = tri.configs_for(batches[0][0], b)[0]
    assert config == entries[0].config and tri.tuner.entry(bucket) is entries[0]
