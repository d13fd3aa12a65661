"""TritonBackend (HBM tables) against TorchBackend, the pure-torch reference backend."""

from __future__ import annotations

import pytest
import torch

from recserve.config import TableConfig
from recserve.embedding.backend import TorchBackend
from recserve.embedding.collection import EmbeddingCollection
from recserve.kernels.tuning import KernelTuner
from recserve.storage.hbm import TritonBackend, _choose_hot
from recserve.types import KeyedJagged

pytestmark = pytest.mark.interpreter

TABLES = (
    TableConfig("a", 120, 32, "sum", dtype="fp32"),
    TableConfig("b", 50, 96, "mean", dtype="int8"),
    TableConfig("c", 30, 16, "sum", dtype="fp16"),
    TableConfig("d", 70, 8, "mean", dtype="bf16"),
    TableConfig("e", 40, 24, "sum", dtype="fp32"),
)


def _features(tables: tuple[TableConfig, ...], batch: int, gen: torch.Generator) -> KeyedJagged:
    lengths = torch.randint(0, 6, (len(tables) * batch,), generator=gen)
    values = torch.cat(
        [
            torch.randint(0, tables[i // batch].num_rows, (int(n),), generator=gen)
            for i, n in enumerate(lengths)
        ]
    )
    weights = torch.rand(values.numel(), generator=gen)
    return KeyedJagged.from_lengths([t.name for t in tables], values, lengths, weights)


@pytest.fixture
def backends(gen: torch.Generator) -> tuple[TorchBackend, TritonBackend]:
    ref = TorchBackend(TABLES)
    ref.reset_parameters(gen)
    return ref, TritonBackend.from_backend(ref)


def test_pooled_matches_torch_backend(
    backends: tuple[TorchBackend, TritonBackend], gen: torch.Generator
) -> None:
    ref, tri = backends
    kj = _features(TABLES, 6, gen)
    for weights in (None, kj.weights):
        expected = ref.pooled(kj.values, kj.offsets, 6, weights, kj.key_offsets())
        out = tri.pooled(kj.values, kj.offsets, 6, weights, kj.key_offsets())
        assert out.shape == (6, sum(t.dim for t in TABLES))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        # Without the host copy of key offsets (the GPU path): same result, no sync needed.
        torch.testing.assert_close(tri.pooled(kj.values, kj.offsets, 6, weights), out)


def test_rows_and_dense_weight(
    backends: tuple[TorchBackend, TritonBackend], gen: torch.Generator
) -> None:
    ref, tri = backends
    for i, t in enumerate(TABLES):
        ids = torch.randint(0, t.num_rows, (3, 4), generator=gen)
        ids[0, 0] = t.num_rows - 1
        torch.testing.assert_close(tri.rows(i, ids), ref.rows(i, ids.reshape(-1)))
        assert torch.equal(tri.dense_weight(i), ref.dense_weight(i))


def test_reordering_keeps_results(
    backends: tuple[TorchBackend, TritonBackend], gen: torch.Generator
) -> None:
    ref, tri = backends
    kj = _features(TABLES, 5, gen)
    before = tri.pooled(kj.values, kj.offsets, 5, kj.weights, kj.key_offsets())
    counts = tri.access_counts(kj.values, kj.offsets, 5)
    info = tri.reorder_hot_rows(counts, hot_bytes=3000)
    assert 0 < info["hot_bytes"] <= 3000 and 0 < info["hot_share"] <= 1
    after = tri.pooled(kj.values, kj.offsets, 5, kj.weights, kj.key_offsets())
    assert torch.equal(after, before)
    upstream = tri.remap_ids(kj.values, kj.key_offsets())
    tri.ids_remapped = True
    assert torch.equal(tri.pooled(upstream, kj.offsets, 5, kj.weights, kj.key_offsets()), before)
    tri.ids_remapped = False
    for i in range(len(TABLES)):
        assert torch.equal(tri.dense_weight(i), ref.dense_weight(i))
    tri.load_table(0, torch.ones(120, 32))  # loading a reordered table keeps the layout valid
    assert torch.equal(tri.dense_weight(0), torch.ones(120, 32))


def test_cpu_fallback_without_triton(
    backends: tuple[TorchBackend, TritonBackend], gen: torch.Generator
) -> None:
    ref, tri = backends
    kj = _features(TABLES, 4, gen)
    tri.use_triton = False
    out = tri.pooled(kj.values, kj.offsets, 4, kj.weights, kj.key_offsets())
    torch.testing.assert_close(
        out,
        ref.pooled(kj.values, kj.offsets, 4, kj.weights, kj.key_offsets()),
        rtol=1e-5,
        atol=1e-6,
    )
    torch.testing.assert_close(
        tri.rows(1, torch.tensor([0, 49])), ref.rows(1, torch.tensor([0, 49]))
    )


def test_behind_an_embedding_collection(gen: torch.Generator) -> None:
    tables = TABLES[:2]
    ref = EmbeddingCollection(tables)
    ref.backend.reset_parameters(gen)
    col = EmbeddingCollection(
        tables, backend_factory=lambda ts: TritonBackend(ts, "cpu", init=False)
    )
    for i in range(len(tables)):
        col.backend.load_table(i, ref.backend.dense_weight(i))
    kj = _features(tables, 4, gen)
    kj.weights = None
    torch.testing.assert_close(col(kj).pooled, ref(kj).pooled, rtol=1e-5, atol=1e-6)


def test_hot_rows_go_by_lookups_per_byte() -> None:
    tables = (TableConfig("x", 10, 4), TableConfig("y", 10, 4))
    counts = [
        torch.tensor([9, 1, 0, 0, 0, 0, 0, 0, 0, 5]),
        torch.tensor([0, 0, 7, 0, 0, 0, 0, 0, 0, 0]),
    ]
    assert _choose_hot(tables, counts, 3 * 16) == [2, 1]
    assert _choose_hot(tables, counts, 1000) == [3, 1]  # never-looked-up rows are never hot


def test_profile_tells_skewed_ids(gen: torch.Generator) -> None:
    tables = (TableConfig("x", 5000, 8), TableConfig("y", 3000, 8))
    tri = TritonBackend(tables, "cpu", init=False)
    offsets = torch.arange(0, 2 * 64 * 4 + 1, 4)
    uniform = torch.cat([torch.randint(0, r, (256,), generator=gen) for r in (5000, 3000)])
    assert tri.profile(uniform, offsets, 64)["skew"] == 0
    hot = torch.randint(0, 20, (512,), generator=gen)
    assert tri.profile(hot, offsets, 64)["skew"] == 2 and tri.skew == 2
    assert tri.configs_for(hot, 64)[0][0].skew == 2
    zipfish = torch.cat(
        [
            torch.randint(0, 50, (256,), generator=gen),
            torch.randint(0, 3000, (256,), generator=gen),
        ]
    )
    assert tri.profile(zipfish, offsets, 64)["skew"] == 1


def test_autotune_on_the_interpreter(gen: torch.Generator) -> None:
    tables = (TableConfig("x", 64, 8), TableConfig("y", 32, 8))
    tri = TritonBackend(tables, "cpu", tuner=KernelTuner("test"), generator=gen)
    offsets = torch.arange(0, 2 * 4 * 3 + 1, 3)
    values = torch.cat([torch.randint(0, t.num_rows, (12,), generator=gen) for t in tables])
    (entry,) = tri.autotune([(values, offsets)], 4, candidates=2)
    assert set(entry.gains or {}) >= {"maxnreg", "evict", "order"}
    assert tri.configs_for(values, 4)[0][1] == entry.config
