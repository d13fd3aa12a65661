"""TieredBackend behind EmbeddingCollection and models; the cost rule; the CPU-mediated peer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from recserve.config import SequenceConfig, TableConfig
from recserve.embedding import EmbeddingCollection
from recserve.embedding.backend import TorchBackend
from recserve.models.io import save_model
from recserve.models.registry import build_model, get_config
from recserve.storage.cache import CacheConfig
from recserve.storage.cost import PathCost, fit_path_cost
from recserve.storage.cpu_mediated import CpuMediatedLookup
from recserve.storage.tiered import TieredBackend, TieredOptions, tiered_backend_factory
from recserve.types import KeyedJagged

Batcher = Callable[..., KeyedJagged]

TABLES = (
    TableConfig("u", 30, 8, placement="host+cache"),
    TableConfig("v", 12, 16, pooling="mean", placement="hbm"),
    TableConfig("w", 25, 8, placement="host", pooled=False),
)
SEQS = (SequenceConfig("hist", "w", 3),)


def _weights(tables: tuple[TableConfig, ...], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t.num_rows, t.dim, generator=g) for t in tables]


def test_collection_with_tiered_backend_matches_torch(seed: int) -> None:
    weights = _weights(TABLES, seed)
    ref = EmbeddingCollection(TABLES, SEQS)
    cfg = CacheConfig(capacity_rows=8, refresh_every=1)
    factory = tiered_backend_factory("cpu", options=TieredOptions(cache=cfg), init=False)
    coll = EmbeddingCollection(TABLES, SEQS, backend_factory=factory)  # type: ignore[arg-type]
    for i, w in enumerate(weights):
        ref.backend.load_table(i, w)  # type: ignore[operator]
        coll.backend.load_table(i, w)  # type: ignore[operator]
    g = torch.Generator().manual_seed(seed)
    for step in range(3):
        b = 4
        lengths = torch.randint(0, 4, (3 * b,), generator=g)
        lengths[2 * b :] = lengths[2 * b :].clamp(max=3)
        ids = torch.cat(
            [
                torch.randint(
                    0, t.num_rows, (int(lengths[i * b : (i + 1) * b].sum()),), generator=g
                )
                for i, t in enumerate(TABLES)
            ]
        )
        kjt = KeyedJagged.from_lengths(["u", "v", "hist"], ids, lengths)
        want, got = ref(kjt), coll(kjt)
        assert torch.allclose(got.pooled, want.pooled, atol=1e-5), step
        rows, mask = got.sequences["hist"]
        assert torch.allclose(rows, want.sequences["hist"][0], atol=1e-6)
        assert torch.equal(mask, want.sequences["hist"][1])


@pytest.mark.parametrize("path", ["auto", "inplace", "dedup"])
def test_paths_agree(path: str, seed: int, batch_of: Batcher) -> None:
    tables = (TableConfig("a", 50, 12, placement="host"), TableConfig("b", 9, 4, placement="host"))
    opts = TieredOptions(cache=None, path=path, cost=PathCost(dedup_us=0.0, inplace_us=1e3))
    tb = TieredBackend(tables, "cpu", options=opts, generator=torch.Generator().manual_seed(seed))
    ref = TorchBackend(tables)
    for i in range(2):
        ref.load_table(i, tb.dense_weight(i))
    kjt = batch_of(tables, 7, 5, seed, weighted=True, hot=3)
    want = ref.pooled(kjt.values, kjt.offsets, 7, kjt.weights, kjt.key_offsets())
    got = tb.pooled(kjt.values, kjt.offsets, 7, kjt.weights, kjt.key_offsets())
    assert torch.allclose(got, want, atol=1e-5)
    assert tb.path_counts["dedup" if path == "auto" else path] == 1


def test_cost_rule_and_fit() -> None:
    rule = PathCost(
        inplace_us=5, inplace_ns_per_row=2, inplace_ns_per_unique=18,
        dedup_us=60, dedup_ns_per_id=0.5, dedup_ns_per_page=25, dedup_ns_per_kb=18,
    )  # fmt: skip
    span = 16 << 30
    assert rule.choose(100, 100 * 256, span=span) == "inplace"  # tiny batch: fixed costs
    assert rule.choose(1_000_000, 256e6, span=span) == "dedup"  # big batch: sorted pages
    assert rule.choose(1_000_000, 256e6, miss=0.01, unique=0.01, span=span) == "inplace"
    assert rule.pages(10, span) == pytest.approx(10, rel=1e-3)
    assert rule.pages(1e9, span) == pytest.approx(span / 65536)
    samples = []
    for n in (1_000, 30_000, 100_000, 1_000_000, 3_000_000):
        for unique, miss in ((1.0, 1.0), (0.3, 1.0), (0.1, 0.2)):
            b = n * 256.0
            common = {"n": n, "bytes": b, "miss": miss, "unique": unique, "span": span}
            samples.append(
                {"path": "inplace", "us": rule.inplace_time_us(n, miss, unique), **common}
            )
            samples.append(
                {"path": "dedup", "us": rule.dedup_time_us(n, b, unique, span), **common}
            )
    fitted = fit_path_cost(samples)
    for key, value in rule.__dict__.items():
        assert getattr(fitted, key) == pytest.approx(value, rel=1e-4), key


def test_model_loads_into_host_tables(tmp_path: Path, seed: int) -> None:
    config = get_config("dlrm-rmc1", "tiny")
    model = build_model(config, seed=seed)
    folder = save_model(model, tmp_path / "m")
    places = {t.name: ("host+cache" if i % 2 else "host") for i, t in enumerate(config.tables)}
    factory = tiered_backend_factory(
        "cpu", places, options=TieredOptions(cache=CacheConfig(capacity_rows=16)), init=False
    )
    tiered = build_model(config, seed=None, backend_factory=factory)  # type: ignore[arg-type]
    backend = tiered.sparse.backend
    assert isinstance(backend, TieredBackend)
    backend.load_safetensors(str(folder / "model.safetensors"))
    for i in range(len(config.tables)):
        assert torch.equal(backend.dense_weight(i), model.sparse.backend.dense_weight(i))
    # The state dict has TorchBackend's names and shapes, both ways.
    state = tiered.state_dict()
    assert set(state) == set(model.state_dict())
    tiered.load_state_dict(model.state_dict())
    arena = backend.host.arena if backend.host is not None else None
    backend.close()
    assert arena is not None and not arena.alive


def test_unresolved_placements_are_refused() -> None:
    with pytest.raises(ValueError, match="planner"):
        TieredBackend((TableConfig("a", 5, 4),), "cpu")
    tb = TieredBackend(
        (TableConfig("a", 5, 4, placement="host+cache"),), "cpu", options=TieredOptions(cache=None)
    )
    assert tb.placements == ("host",) and tb.cache is None


def test_cpu_mediated_matches_reference(seed: int, batch_of: Batcher) -> None:
    tables = (
        TableConfig("a", 40, 16, placement="host"),
        TableConfig("b", 30, 32, pooling="mean", placement="host"),
    )
    tb = TieredBackend(
        tables,
        "cpu",
        options=TieredOptions(cache=None),
        generator=torch.Generator().manual_seed(seed),
    )
    peer = CpuMediatedLookup(tb, threads=2)
    ref = TorchBackend(tables)
    for i in range(2):
        ref.load_table(i, tb.dense_weight(i))
    for step in range(2):
        kjt = batch_of(tables, 6, 5, seed + step, hot=4)
        want = ref.pooled(kjt.values, kjt.offsets, 6, None, kjt.key_offsets())
        got = peer.pooled(kjt.values, kjt.offsets, 6, kjt.key_offsets())
        assert torch.allclose(got, want, atol=1e-5)
    peer.close()
    with pytest.raises(ValueError, match="one row stride"):
        CpuMediatedLookup(
            TieredBackend(
                (
                    TableConfig("a", 4, 16, placement="host"),
                    TableConfig("b", 4, 64, placement="host"),
                ),
                "cpu",
                options=TieredOptions(cache=None),
            )
        )


@pytest.mark.gpu
def test_gpu_paths_match_reference(batch_of: Batcher) -> None:
    tables = (
        TableConfig("a", 5000, 64, placement="host+cache"),
        TableConfig("b", 3000, 32, pooling="mean", placement="host"),
        TableConfig("c", 100, 16, placement="hbm", dtype="fp16"),
        TableConfig("d", 2000, 40, placement="host+cache", dtype="int8"),
    )
    ref = TorchBackend(tables, "cuda")
    ref.reset_parameters(torch.Generator(device="cuda").manual_seed(5))
    cfg = CacheConfig(capacity_rows=600, refresh_every=2)
    tb = TieredBackend(tables, "cuda", options=TieredOptions(cache=cfg), init=False)
    for i in range(len(tables)):
        tb.load_stored(
            i,
            0,
            ref.weights[i].detach().cpu(),
            None if ref.scale_bias(i) is None else ref.scale_bias(i).cpu(),
        )  # type: ignore[union-attr]
    assert tb.host is not None and tb.host.arena.registered
    for path in ("inplace", "dedup", "auto"):
        tb.options.path = path
        for step in range(4):
            kjt = batch_of(tables, 256, 30, step, weighted=step == 3, hot=50)
            v, o = kjt.values.cuda(), kjt.offsets.cuda()
            w = kjt.weights.cuda() if kjt.weights is not None else None
            want = ref.pooled(v, o, 256, w, kjt.key_offsets())
            got = tb.pooled(v, o, 256, w, kjt.key_offsets())
            err = (got - want).norm() / want.norm()
            assert err < 1e-3, (path, step, float(err))
    stats = tb.cache_stats()
    assert stats["a"]["hits"] > 0 and stats["d"]["hits"] > 0
    tb.close()


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_gpu_dedup_and_inplace_record_alike(policy: str, batch_of: Batcher) -> None:
    """On the device: per-lookup (relaxed atomics) and per-distinct-row recording give the same
    scores and statistics, and both paths the same sums, under heavy repeats."""
    tables = (
        TableConfig("a", 4000, 64, placement="host+cache"),
        TableConfig("b", 3000, 32, placement="host"),
        TableConfig("d", 2000, 40, placement="host+cache", dtype="int8"),
    )
    cfg = CacheConfig(policy=policy, capacity_rows=500, refresh_every=0)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(3)
    counts = [torch.randperm(t.num_rows, generator=g) for t in tables]  # no ties at the edge
    backends = []
    for path in ("inplace", "dedup"):
        tb = TieredBackend(
            tables,
            "cuda",
            options=TieredOptions(cache=cfg, path=path),
            generator=torch.Generator().manual_seed(5),
        )
        tb.prewarm(counts)
        backends.append(tb)
    for step in range(3):
        kjt = batch_of(tables, 512, 40, step, hot=20)
        v, o = kjt.values.cuda(), kjt.offsets.cuda()
        outs = [tb.pooled(v, o, 512, None, kjt.key_offsets()) for tb in backends]
        assert torch.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4), step
    caches = [tb.cache for tb in backends]
    assert caches[0] is not None and caches[1] is not None
    assert torch.equal(caches[0].score, caches[1].score)
    assert torch.equal(caches[0].counts(), caches[1].counts())
    assert int(caches[0].counts()[:, 1].sum()) > 0
    for tb in backends:
        tb.close()
