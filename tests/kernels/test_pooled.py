"""The pooled-lookup kernel against its float64 reference, under the Triton interpreter."""

from __future__ import annotations

import pytest
import torch
from kernel_inputs import jagged, rel_err

from recserve.kernels.layout import pack_tables, row_layout, to_stored, unpack_table
from recserve.kernels.pooled import PooledConfig, pooled_lookup
from recserve.kernels.reference import pooled_packed, pooled_reference

pytestmark = pytest.mark.interpreter

# fp32 accumulation of rows that the reference reads exactly as stored: only summation
# rounding differs (the storage rounding of fp16/bf16/int8 is in the reference too).
TOL = 1e-5
FP16_OUT_TOL = 2e-3

CONFIGS = [
    PooledConfig(bags=1, rows=8),
    PooledConfig(bags=4, rows=2, num_warps=2, order="bag"),
    PooledConfig(bags=16, rows=1),
    PooledConfig(bags=2, rows=4, maxnreg=64, num_stages=3, evict="first"),
    PooledConfig(bags=4, rows=4, num_warps=1, evict="last"),
    PooledConfig(bags=2, rows=2, prefetch=True),
    PooledConfig(bags=1, rows=4, evict="first", num_stages=3, prefetch=True),
    PooledConfig(bags=4, rows=2, early_offsets=True),
    PooledConfig(bags=2, rows=4, order="bag", prefetch=True, early_offsets=True),
]


def _run(
    dtype: str,
    dims: list[int],
    rows: list[int],
    batch: int,
    config: PooledConfig,
    gen: torch.Generator,
    *,
    poolings: list[str] | None = None,
    weighted: bool = False,
    max_len: int = 9,
    fixed: int | None = None,
    out_dtype: torch.dtype = torch.float32,
    id_dtype: torch.dtype = torch.int64,
) -> float:
    tables = [
        to_stored(torch.randn(r, d, generator=gen), dtype) for r, d in zip(rows, dims, strict=True)
    ]
    poolings = poolings or ["sum"] * len(dims)
    cols = [sum(dims[:i]) for i in range(len(dims))]
    packed = pack_tables(
        tables, dtype, cols=cols, features=list(range(len(dims))), poolings=poolings
    )
    values, offsets = jagged(rows, batch, max_len, gen, fixed)
    psw = torch.rand(values.numel(), generator=gen) if weighted else None
    out = torch.full((batch, sum(dims)), float("nan"), dtype=out_dtype)
    pooled_lookup(packed, values.to(id_dtype), offsets, batch, out, config, psw)
    ref = pooled_reference(tables, values, offsets, batch, poolings, per_sample_weights=psw)
    return rel_err(out, ref)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "int8"])
@pytest.mark.parametrize(
    "config",
    CONFIGS,
    ids=lambda c: f"b{c.bags}r{c.rows}o{c.order[0]}{'p' * c.prefetch}{'f' * c.early_offsets}",
)
def test_matches_reference(dtype: str, config: PooledConfig, gen: torch.Generator) -> None:
    assert _run(dtype, [32, 32], [60, 45], 6, config, gen, poolings=["sum", "mean"]) < TOL


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_dim96_and_mixed_dims(dtype: str, gen: torch.Generator) -> None:
    dims, rows = [96, 8, 40, 64], [30, 11, 25, 40]
    for config in (PooledConfig(bags=2, rows=4), PooledConfig(bags=8, rows=1, order="bag")):
        assert _run(dtype, dims, rows, 5, config, gen) < TOL


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_weighted_and_mean(dtype: str, prefetch: bool, gen: torch.Generator) -> None:
    err = _run(
        dtype,
        [16, 24],
        [40, 20],
        7,
        PooledConfig(2, 4, prefetch=prefetch),
        gen,
        poolings=["mean", "sum"],
        weighted=True,
    )
    assert err < TOL


@pytest.mark.parametrize("fixed", [0, 1])
def test_pooling_zero_and_one(fixed: int, gen: torch.Generator) -> None:
    for config in (PooledConfig(bags=1, rows=4), PooledConfig(bags=16, rows=1)):
        tables = [to_stored(torch.randn(50, 16, generator=gen), "fp32")]
        packed = pack_tables(tables, "fp32", cols=[0], features=[0], poolings=["mean"])
        values, offsets = jagged([50], 9, 0, gen, fixed)
        out = torch.full((9, 16), float("nan"))
        pooled_lookup(packed, values, offsets, 9, out, config)
        expected = tables[0].rows[values] if fixed else torch.zeros(9, 16)
        assert torch.equal(out, expected)


@pytest.mark.parametrize("prefetch", [False, True])
def test_long_bags_and_the_last_row(prefetch: bool, gen: torch.Generator) -> None:
    config = PooledConfig(bags=1, rows=8, prefetch=prefetch)
    assert _run("fp16", [32], [17], 3, config, gen, max_len=70) < TOL


def test_fp16_output_and_int32_ids(gen: torch.Generator) -> None:
    err = _run(
        "fp32",
        [32, 16],
        [40, 40],
        5,
        PooledConfig(2, 4),
        gen,
        out_dtype=torch.float16,
        id_dtype=torch.int32,
    )
    assert err < FP16_OUT_TOL


def test_writes_only_its_columns(gen: torch.Generator) -> None:
    """Tables write their own column ranges: columns outside them stay untouched."""
    tables = [to_stored(torch.randn(20, 8, generator=gen), "fp32")]
    packed = pack_tables(tables, "fp32", cols=[4], features=[0], poolings=["sum"])
    values, offsets = jagged([20], 3, 4, gen)
    out = torch.full((3, 16), 7.0)
    pooled_lookup(packed, values, offsets, 3, out, PooledConfig(2, 2))
    assert torch.equal(out[:, :4], torch.full((3, 4), 7.0))
    assert torch.equal(out[:, 12:], torch.full((3, 4), 7.0))


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_reordering_gives_identical_results(dtype: str, gen: torch.Generator) -> None:
    dims, rows, batch = [32, 96, 16], [50, 30, 20], 6
    tables = [
        to_stored(torch.randn(r, d, generator=gen), dtype) for r, d in zip(rows, dims, strict=True)
    ]
    kw = {"cols": [0, 32, 128], "features": [0, 1, 2], "poolings": ["sum", "mean", "sum"]}
    plain = pack_tables(tables, dtype, **kw)
    orders = [torch.randperm(r, generator=gen) for r in rows]
    hot = pack_tables(tables, dtype, order=orders, n_hot=[7, 0, 20], **kw)
    values, offsets = jagged(rows, batch, 8, gen)
    expected = torch.empty(batch, 144)
    pooled_lookup(plain, values, offsets, batch, expected, PooledConfig(2, 4))
    upstream = torch.cat(
        [
            hot.remap[sum(rows[:t]) + values[s:e]].long()
            for t, (s, e) in enumerate(_spans(offsets, batch, 3))
        ]
    )
    for evict, prefetch in (("none", False), ("hotcold", False), ("hotcold", True)):
        config = PooledConfig(2, 4, evict=evict, prefetch=prefetch)
        out = torch.empty(batch, 144)
        pooled_lookup(hot, values, offsets, batch, out, config)
        assert torch.equal(out, expected)
        pooled_lookup(hot, upstream, offsets, batch, out, config, remap=False)
        assert torch.equal(out, expected)
    for t in range(3):
        back = unpack_table(hot, t)
        assert torch.equal(back.rows, tables[t].rows)
        if dtype == "int8":
            assert torch.equal(back.scale_bias, tables[t].scale_bias)


def test_torch_twin_of_the_kernel(gen: torch.Generator) -> None:
    """The CPU path (pooled_packed) computes the same as the kernel on the same layout."""
    tables = [to_stored(torch.randn(40, d, generator=gen), "int8") for d in (32, 20)]
    orders = [torch.randperm(40, generator=gen) for _ in tables]
    packed = pack_tables(
        tables,
        "int8",
        cols=[0, 32],
        features=[0, 1],
        poolings=["sum", "mean"],
        order=orders,
        n_hot=[5, 9],
    )
    values, offsets = jagged([40, 40], 5, 6, gen)
    psw = torch.rand(values.numel(), generator=gen)
    a, b = torch.empty(5, 52), torch.empty(5, 52)
    pooled_lookup(packed, values, offsets, 5, a, PooledConfig(4, 2), psw)
    pooled_packed(packed, values, offsets, 5, b, psw)
    assert rel_err(a, b.double()) < TOL


def test_row_layout_is_16_byte_aligned() -> None:
    for dtype, size in (("fp32", 4), ("fp16", 2), ("int8", 1)):
        for dim in (1, 8, 30, 96, 128):
            stride, width, scale_off = row_layout(dim, dtype)
            assert (stride * size) % 16 == 0 and width >= dim and stride >= width
            if dtype == "int8":
                assert scale_off % 4 == 0 and scale_off >= dim and stride >= scale_off + 8


def test_rejects_bad_configs() -> None:
    with pytest.raises(ValueError):
        PooledConfig(bags=3)
    with pytest.raises(ValueError):
        PooledConfig(evict="sometimes")
    with pytest.raises(ValueError):
        PooledConfig(order="random")


def _spans(offsets: torch.Tensor, batch: int, num: int) -> list[tuple[int, int]]:
    return [(int(offsets[t * batch]), int(offsets[(t + 1) * batch])) for t in range(num)]


def test_early_offsets_apply_only_where_tables_read_their_own_feature(
    gen: torch.Generator,
) -> None:
    dims, rows, batch = [16, 8], [40, 30], 5
    tables = [
        to_stored(torch.randn(r, d, generator=gen), "fp32") for r, d in zip(rows, dims, strict=True)
    ]
    values, offsets = jagged([30, 40], batch, 6, gen)  # feature 0 has ids < 30, feature 1 < 40
    crossed = pack_tables(tables, "fp32", cols=[0, 16], features=[1, 0], poolings=["sum"] * 2)
    in_order = pack_tables(tables, "fp32", cols=[0, 16], features=[0, 1], poolings=["sum"] * 2)
    assert not crossed.features_in_order and in_order.features_in_order
    outs = []
    for early in (False, True):
        out = torch.full((batch, 24), float("nan"))
        pooled_lookup(crossed, values, offsets, batch, out, PooledConfig(2, 4, early_offsets=early))
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1])  # the flag falls back: table 0 reads feature 1
    ref = pooled_reference(tables, values, offsets, batch, ["sum"] * 2, features=[1, 0])
    assert rel_err(outs[1], ref) < TOL
