"""The paper presets have exactly the shapes of WORKLOADS.md (computed without allocating)."""

from __future__ import annotations

import itertools

import pytest

from recserve.models import get_config, parameter_counts

# model: (tables as (count, rows), dim, L, bottom MLP, top MLP, embedding GB as in the table)
PAPER = {
    "dlrm-rmc1": ([(8, 4_000_000)], 32, 80, (128, 64, 32), (288, 256, 64, 1), 4.1),
    "dlrm-rmc2": ([(32, 500_000)], 64, 120, (256, 128, 64), (2112, 128, 64, 1), 4.1),
    "dlrm-rmc3": ([(10, 2_000_000)], 32, 20, (2560, 1024, 256, 32), (352, 512, 256, 1), 2.6),
    "wnd": ([(27, 1_000_000)], 32, 1, (), (1376, 1024, 512, 256, 1), 3.5),
    "mt-wnd": ([(41, 500_000), (2, 5_000_000)], 32, 1, (), (1888, 1024, 512), 3.9),
    "ncf": ([(2, 140_000), (2, 28_000)], 64, 1, (), (128, 256, 256, 128, 64), 0.086),
    "din": ([(1, 1_000_000), (1, 100_000), (2, 10_000_000)], 32, 3, (), (128, 200, 80, 2), 2.7),
    "dien": ([(41, 500_000), (2, 5_000_000)], 32, 1, (), (160, 200, 80, 2), 3.9),
}


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_shapes(name: str) -> None:
    groups, dim, lookups, bottom, top, gb = PAPER[name]
    cfg = get_config(name, "paper")
    rows = sorted(t.num_rows for t in cfg.tables)
    assert rows == sorted(r for n, r in groups for _ in range(n))
    assert {t.dim for t in cfg.tables} == {dim}
    assert {t.lookups for t in cfg.tables if t.pooled} == {lookups}
    assert cfg.bottom_mlp == bottom
    assert cfg.top_mlp == top
    digits = 3 if gb < 1 else 1
    assert round(cfg.embedding_bytes / 1e9, digits) == gb


def test_paper_parameter_counts_from_configs() -> None:
    """Dense parameters counted on the meta device equal the count from the layer widths."""
    cfg = get_config("dlrm-rmc1", "paper")
    counts = parameter_counts(cfg)

    def mlp(widths: tuple[int, ...]) -> int:
        return sum(a * b + b for a, b in itertools.pairwise(widths))

    assert counts["dense_parameters"] == mlp(cfg.bottom_mlp) + mlp(cfg.top_mlp)
    assert counts["embedding_parameters"] == 8 * 4_000_000 * 32
    assert counts["embedding_bytes"] == 8 * 4_000_000 * 32 * 4
    wnd = get_config("wnd", "paper")
    # deep MLP + wide linear over [dense 512, 27 × 32 embeddings]
    assert parameter_counts(wnd)["dense_parameters"] == mlp(wnd.top_mlp) + 1376 + 1


def test_mt_wnd_tasks_and_dot_interaction_widths() -> None:
    assert get_config("mt-wnd", "paper", num_tasks=5).num_tasks == 5
    dot = get_config("dlrm-rmc2", "paper", interaction="dot")
    assert dot.top_mlp[0] == 64 + 33 * 32 // 2


def test_scale_multiplies_rows() -> None:
    base, big = get_config("wnd"), get_config("wnd", scale=10)
    assert [t.num_rows * 10 for t in base.tables] == [t.num_rows for t in big.tables]


def test_unknown_names_are_clear() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        get_config("dlrm-rmc9")
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("wnd", "huge")
