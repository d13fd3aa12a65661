"""Table-batched pooled embedding lookup: one Triton launch for every table of a group.

Formula, for table ``t`` and item ``b`` with ids ``v[s:e]`` (``s, e = offsets[f_t*B + b],
offsets[f_t*B + b + 1]``)::

    out[b, col_t : col_t + D_t] = scale_b * sum_{i in [s, e)} w_i * row_t(v[i])

with ``w_i`` the per-sample weight (1 without weights), ``scale_b = 1 / max(e - s, 1)`` for
mean pooling and 1 for sum, and ``row_t`` the stored row converted to fp32 (int8 rows:
``q * scale + bias``). Accumulation is fp32; the output is fp32 or fp16.

Layout of the packed rows (one flat buffer per row dtype, see :class:`PackedRows` and
:mod:`recserve.kernels.layout`): table ``t``'s
row ``r`` starts at element ``base_t + r * stride_t``; ``stride_t`` is padded to 16 bytes so
every row starts 16-byte aligned and loads are 16-byte vectors. After hot-row reordering
(:mod:`recserve.storage.hbm`) the rows ``r < n_hot_t`` live in one hot region shared by all
tables (one contiguous range for the L2 access-policy window) and the rest in a cold region,
so the row address is ``(r < n_hot_t ? hot_base_t : cold_base_t) + r * stride_t``. int8 rows
hold ``D`` uint8 codes, then (8-byte aligned) an fp32 scale and an fp32 bias.

Work split: a program owns ``BAGS`` consecutive items of one table and walks their ids in
steps of ``ROWS`` positions, keeping a ``[BAGS, ROWS, BLOCK_D]`` tile of rows in flight and
accumulating it element-wise (no cross-thread reduction inside the loop; one at the end).
``BAGS=1, ROWS=8`` is one bag per program with 8 rows in flight (long bags); ``BAGS=64,
ROWS=1`` puts 64 one-id bags in one program (pooling 1); mixed shapes such as ``8x4`` often
win (the tuner decides per shape bucket).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl

# Columns of the per-table metadata tensor ``[T, META_COLS]`` int64, in elements of the row
# dtype: where the hot and cold rows start, how many rows are hot, the row stride, how many
# elements a row load covers (D rounded up to 16 bytes), D, the first output column, 1 for mean
# pooling, which feature of the KeyedJagged the table reads, where its slice of the remap
# buffer starts, and (int8) the byte offset of the scale and bias within a row.
META_FIELDS = (
    "hot_base",
    "cold_base",
    "n_hot",
    "stride",
    "width",
    "dim",
    "col",
    "mean",
    "feature",
    "remap_base",
    "scale_off",
)
META_COLS = len(META_FIELDS)
# The same positions as compile-time constants for the kernel.
_NCOL = tl.constexpr(META_COLS)
_HOT_BASE = tl.constexpr(0)
_COLD_BASE = tl.constexpr(1)
_N_HOT = tl.constexpr(2)
_STRIDE = tl.constexpr(3)
_WIDTH = tl.constexpr(4)
_DIM = tl.constexpr(5)
_COL = tl.constexpr(6)
_MEAN = tl.constexpr(7)
_FEATURE = tl.constexpr(8)
_REMAP_BASE = tl.constexpr(9)
_SCALE_OFF = tl.constexpr(10)

EVICT_MODES = ("none", "first", "hotcold", "last")
ORDERS = ("table", "bag")


@dataclass(frozen=True)
class PooledConfig:
    """The knobs of one launch (the MICRO'24 levers), each switchable and measured.

    ``bags * rows`` is the number of rows each program keeps in flight (the software prefetch
    distance); ``maxnreg`` caps registers per thread (the paper's occupancy fix; 0 = no cap);
    ``num_stages`` software-pipelines the id -> row loop (1 = off; above 1 the row loads become
    ``cp.async``, which skips L1); ``evict`` picks cache hints: ``none``, ``first`` (every row
    ``evict_first``: rows are streamed once), ``last`` (every row ``evict_last``: skewed ids
    read the same rows again, so they should stay in L1) or ``hotcold`` (``evict_last`` for
    rows in the hot prefix, ``evict_first`` for the rest); ``order`` maps
    programs to work table-major (``table``: consecutive programs share a table) or bag-major
    (``bag``: consecutive programs cover all tables of the same items, so output rows are
    written whole by programs running together); ``prefetch`` requests each step's rows one
    step and its ids two steps ahead, in registers (software prefetching that keeps L1, unlike
    ``num_stages``; twice the rows in flight for the same tile); ``early_offsets`` takes each
    table's feature to be its index, so a program loads its bags' offsets at once instead of
    after the table's metadata (one dependent load fewer before the ids; it applies only where
    the tables read the features in order, :attr:`PackedRows.features_in_order`).
    """

    bags: int = 1
    rows: int = 32
    num_warps: int = 4
    maxnreg: int = 0
    num_stages: int = 1
    evict: str = "none"
    order: str = "table"
    prefetch: bool = False
    early_offsets: bool = False

    def __post_init__(self) -> None:
        for name in ("bags", "rows"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 1, got {v}")
        if self.evict not in EVICT_MODES:
            raise ValueError(f"evict must be one of {EVICT_MODES}, got {self.evict!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, int | str]) -> PooledConfig:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)  # type: ignore[arg-type]


@triton.jit
def _ids(j, pos0, start, length, values_ptr, remap_ptr, remap_base, REMAP: tl.constexpr):
    """Step ``j`` of every bag of the tile: which positions are in the bag, where their ids
    are, and the ids (through the reordering permutation when ``REMAP``)."""
    pos = j + pos0
    ok = pos[None, :] < length[:, None]
    idx = start[:, None] + pos[None, :]
    ids = tl.load(values_ptr + idx, mask=ok, other=0).to(tl.int64)
    if REMAP:
        ids = tl.load(remap_ptr + remap_base + ids, mask=ok, other=0).to(tl.int64)
    return ok, idx, ids


@triton.jit
def _rows(
    ok, idx, ids, psw_ptr, rows_ptr, rows_sb_ptr, hot_base, cold_base, n_hot, stride,
    scale_off, d, d_ok, VEC: tl.constexpr, QUANT: tl.constexpr, HAS_PSW: tl.constexpr,
    SPLIT_HOT: tl.constexpr, EVICT: tl.constexpr,
):  # fmt: skip
    """The rows of one step (fp32), their per-sample weights and int8 scale/bias pairs (each
    a placeholder where its flag is off)."""
    if SPLIT_HOT:
        hot = ids < n_hot
        row = tl.where(hot, hot_base, cold_base) + ids * stride
    else:
        hot = ok
        row = cold_base + ids * stride
    row = tl.multiple_of(row, [VEC, VEC])
    ptrs = rows_ptr + row[:, :, None] + d[None, None, :]
    m = ok[:, :, None] & d_ok[None, None, :]
    if EVICT == "hotcold":
        h = hot[:, :, None]
        x_hot = tl.load(ptrs, mask=m & h, other=0.0, eviction_policy="evict_last")
        x_cold = tl.load(ptrs, mask=m & ~h, other=0.0, eviction_policy="evict_first")
        x = x_hot.to(tl.float32) + x_cold.to(tl.float32)
    elif EVICT == "first":
        x = tl.load(ptrs, mask=m, other=0.0, eviction_policy="evict_first").to(tl.float32)
    elif EVICT == "last":
        x = tl.load(ptrs, mask=m, other=0.0, eviction_policy="evict_last").to(tl.float32)
    else:
        x = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
    w = ok.to(tl.float32)
    if HAS_PSW:
        w = tl.load(psw_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    sb = ok.to(tl.int64)
    if QUANT:
        # Scale and bias (fp32 each) follow the codes, 8-byte aligned: one 8-byte load.
        sb = tl.load(rows_sb_ptr + (row + scale_off) // 8, mask=ok, other=0)
    return x, w, sb


@triton.jit
def _accumulate(acc, bias_acc, x, w, sb, QUANT: tl.constexpr, HAS_PSW: tl.constexpr):
    """Add one step's rows. int8: the bias does not depend on the column, so it is summed
    once per row, not per element (acc += q * scale, bias_acc += bias)."""
    if QUANT:
        scale = sb.to(tl.int32).to(tl.float32, bitcast=True)
        bias = (sb >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        if HAS_PSW:
            scale = scale * w
            bias = bias * w
        acc += x * scale[:, :, None]
        bias_acc += bias
    elif HAS_PSW:
        acc += x * w[:, :, None]
    else:
        acc += x
    return acc, bias_acc


@triton.jit
def _pooled_kernel(
    values_ptr,
    offsets_ptr,
    psw_ptr,
    rows_ptr,
    rows_sb_ptr,
    meta_ptr,
    remap_ptr,
    out_ptr,
    batch,
    num_tables,
    out_stride,
    BAGS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    VEC: tl.constexpr,
    EVEN_D: tl.constexpr,
    QUANT: tl.constexpr,
    HAS_PSW: tl.constexpr,
    SPLIT_HOT: tl.constexpr,
    REMAP: tl.constexpr,
    EVICT: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    BAG_MAJOR: tl.constexpr,
    PREFETCH: tl.constexpr = False,
    EARLY_OFFSETS: tl.constexpr = False,
):
    pid = tl.program_id(0)
    if BAG_MAJOR:
        blk = pid // num_tables
        t = pid - blk * num_tables
    else:
        blocks = tl.cdiv(batch, BAGS)
        t = pid // blocks
        blk = pid - t * blocks

    meta = meta_ptr + t * _NCOL
    stride = tl.multiple_of(tl.load(meta + _STRIDE), VEC)
    width = tl.multiple_of(tl.load(meta + _WIDTH), VEC)
    dim = tl.load(meta + _DIM)
    col = tl.load(meta + _COL)
    # Table t reads feature t: the offsets need not wait for the metadata.
    if EARLY_OFFSETS:  # noqa: SIM108 (a compile-time branch in a Triton kernel)
        feature = t.to(tl.int64)
    else:
        feature = tl.load(meta + _FEATURE)
    cold_base = tl.multiple_of(tl.load(meta + _COLD_BASE), VEC)
    hot_base = cold_base  # placeholders where the flags leave them unread
    n_hot = cold_base
    remap_base = cold_base
    scale_off = cold_base
    if SPLIT_HOT:
        hot_base = tl.multiple_of(tl.load(meta + _HOT_BASE), VEC)
        n_hot = tl.load(meta + _N_HOT)
    if REMAP:
        remap_base = tl.load(meta + _REMAP_BASE)
    if QUANT:
        scale_off = tl.load(meta + _SCALE_OFF)

    bags = blk * BAGS + tl.arange(0, BAGS)
    bag_ok = bags < batch
    bag_idx = feature * batch + bags
    start = tl.load(offsets_ptr + bag_idx, mask=bag_ok, other=0)
    end = tl.load(offsets_ptr + bag_idx + 1, mask=bag_ok, other=0)
    length = end - start
    max_len = tl.max(length, axis=0)

    d = tl.arange(0, BLOCK_D)
    if EVEN_D:  # noqa: SIM108 (a compile-time branch in a Triton kernel)
        d_ok = d < BLOCK_D
    else:
        # ``width`` is D rounded up to VEC elements (inside the padded row), so comparing in
        # units of VEC keeps the mask constant over each 16-byte vector: loads stay vectorised.
        # Columns past D are loaded but never stored.
        d_ok = (d // VEC) < (width // VEC)
    pos0 = tl.arange(0, ROWS)
    acc = tl.zeros((BAGS, ROWS, BLOCK_D), dtype=tl.float32)
    bias_acc = tl.zeros((BAGS, ROWS), dtype=tl.float32)
    if PREFETCH:
        # Software prefetching: the ids of step j + 2 and the rows of step j + 1 are requested
        # before step j's rows are added, so no step waits for a load it has just issued
        # (the loads past a bag's end are masked off: no memory traffic).
        ok1, idx1, ids1 = _ids(0, pos0, start, length, values_ptr, remap_ptr, remap_base, REMAP)
        ok2, idx2, ids2 = _ids(ROWS, pos0, start, length, values_ptr, remap_ptr, remap_base, REMAP)
        x1, w1, sb1 = _rows(
            ok1, idx1, ids1, psw_ptr, rows_ptr, rows_sb_ptr, hot_base, cold_base, n_hot,
            stride, scale_off, d, d_ok, VEC, QUANT, HAS_PSW, SPLIT_HOT, EVICT,
        )  # fmt: skip
        for j in tl.range(0, max_len, ROWS, num_stages=NUM_STAGES):
            ok3, idx3, ids3 = _ids(
                j + 2 * ROWS, pos0, start, length, values_ptr, remap_ptr, remap_base, REMAP
            )
            x2, w2, sb2 = _rows(
                ok2, idx2, ids2, psw_ptr, rows_ptr, rows_sb_ptr, hot_base, cold_base, n_hot,
                stride, scale_off, d, d_ok, VEC, QUANT, HAS_PSW, SPLIT_HOT, EVICT,
            )  # fmt: skip
            acc, bias_acc = _accumulate(acc, bias_acc, x1, w1, sb1, QUANT, HAS_PSW)
            x1, w1, sb1 = x2, w2, sb2
            ok2, idx2, ids2 = ok3, idx3, ids3
    else:
        for j in tl.range(0, max_len, ROWS, num_stages=NUM_STAGES):
            ok, idx, ids = _ids(j, pos0, start, length, values_ptr, remap_ptr, remap_base, REMAP)
            x, w, sb = _rows(
                ok, idx, ids, psw_ptr, rows_ptr, rows_sb_ptr, hot_base, cold_base, n_hot,
                stride, scale_off, d, d_ok, VEC, QUANT, HAS_PSW, SPLIT_HOT, EVICT,
            )  # fmt: skip
            acc, bias_acc = _accumulate(acc, bias_acc, x, w, sb, QUANT, HAS_PSW)

    pooled = tl.sum(acc, axis=1)
    if QUANT:
        pooled += tl.sum(bias_acc, axis=1)[:, None]
    mean = tl.load(meta + _MEAN)
    inv = tl.where(mean != 0, 1.0 / tl.maximum(length, 1).to(tl.float32), 1.0)
    pooled = pooled * inv[:, None]
    out_ptrs = out_ptr + bags[:, None].to(tl.int64) * out_stride + col + d[None, :]
    out_mask = bag_ok[:, None] & (d < dim)[None, :]
    tl.store(out_ptrs, pooled.to(out_ptr.dtype.element_ty), mask=out_mask)


@dataclass(frozen=True)
class PackedRows:
    """Rows of a group of tables of one dtype, packed for :func:`pooled_lookup`.

    ``rows`` is the flat buffer (uint8 for int8 tables; ``rows_sb`` is an int64 view of the
    same bytes, for the scale and bias pair), ``meta [T, META_COLS]`` int64 on the same device,
    ``remap`` an int32 buffer of old -> new row ids after hot-row reordering (or None).
    ``num_rows`` counts each table's rows; ``block_d`` is the tile width (next power of two of
    the widest row), ``vec`` the elements in 16 bytes, ``even_d`` whether every table's row
    load covers exactly ``block_d`` elements (no column mask).
    """

    rows: torch.Tensor
    rows_sb: torch.Tensor | None
    meta: torch.Tensor
    remap: torch.Tensor | None
    num_tables: int
    num_rows: tuple[int, ...]
    block_d: int
    vec: int
    even_d: bool
    quant: bool
    split_hot: bool
    meta_host: torch.Tensor
    """A host copy of ``meta`` (layout bookkeeping without device syncs)."""

    @functools.cached_property
    def features_in_order(self) -> bool:
        """Whether table ``t`` reads feature ``t`` for every table (what ``early_offsets``
        needs)."""
        features = self.meta_host[: self.num_tables, META_FIELDS.index("feature")]
        return bool(torch.equal(features, torch.arange(self.num_tables, dtype=features.dtype)))


def pooled_lookup(
    packed: PackedRows,
    values: torch.Tensor,
    offsets: torch.Tensor,
    batch_size: int,
    out: torch.Tensor,
    config: PooledConfig,
    per_sample_weights: torch.Tensor | None = None,
    remap: bool | None = None,
) -> torch.Tensor:
    """Launch the pooled lookup for every table of ``packed``, writing into ``out [B, *]``.

    ``values`` (int32/int64 ids) and ``offsets`` (``[F*B + 1]``) are in KeyedJagged layout;
    each table reads feature ``meta[t, feature]`` and writes columns ``[col_t, col_t + D_t)``
    of ``out`` (fp32 or fp16). ``remap`` (default: whenever ``packed.remap`` exists) translates
    ids through the reordering permutation in the kernel; pass False when the ids are already
    in the reordered numbering. No host synchronisation.
    """
    _launch(packed, values, offsets, batch_size, out, config, per_sample_weights, remap)
    return out


def kernel_resources(
    packed: PackedRows,
    values: torch.Tensor,
    offsets: torch.Tensor,
    batch_size: int,
    out: torch.Tensor,
    config: PooledConfig,
    per_sample_weights: torch.Tensor | None = None,
    remap: bool | None = None,
) -> dict[str, int]:
    """Launch like :func:`pooled_lookup` and report the compiled kernel's registers per
    thread, spilled registers and shared memory (what the occupancy levers act on)."""
    kernel = _launch(packed, values, offsets, batch_size, out, config, per_sample_weights, remap)
    if kernel is None or not hasattr(kernel, "n_regs"):
        return {}
    return {
        "n_regs": int(kernel.n_regs),
        "n_spills": int(kernel.n_spills),
        "shared": int(kernel.metadata.shared),
    }


def _launch(
    packed: PackedRows,
    values: torch.Tensor,
    offsets: torch.Tensor,
    batch_size: int,
    out: torch.Tensor,
    config: PooledConfig,
    per_sample_weights: torch.Tensor | None,
    remap: bool | None,
) -> object:
    if out.stride(1) != 1:
        raise ValueError("out must have unit stride along its columns")
    do_remap = packed.remap is not None if remap is None else remap
    if do_remap and packed.remap is None:
        raise ValueError("remap requested but these rows were never reordered")
    if config.evict == "hotcold" and not packed.split_hot:
        # Hot/cold hints need the hot prefix; without reordering every row is cold (streamed).
        config = PooledConfig(**{**config.to_dict(), "evict": "first"})  # type: ignore[arg-type]
    early_offsets = config.early_offsets and packed.features_in_order
    grid = (packed.num_tables * triton.cdiv(batch_size, config.bags),)
    if grid[0] == 0:
        return None
    # Unused pointer arguments get a tensor of the right device (never read: the flags are off).
    kwargs = {"num_warps": config.num_warps}
    if config.maxnreg:
        kwargs["maxnreg"] = config.maxnreg
    return _pooled_kernel[grid](
        values,
        offsets,
        per_sample_weights if per_sample_weights is not None else values,
        packed.rows,
        packed.rows_sb if packed.rows_sb is not None else packed.rows,
        packed.meta,
        packed.remap if do_remap else packed.meta,
        out,
        batch_size,
        packed.num_tables,
        out.stride(0),
        BAGS=config.bags,
        ROWS=config.rows,
        BLOCK_D=packed.block_d,
        VEC=packed.vec,
        EVEN_D=packed.even_d,
        QUANT=packed.quant,
        HAS_PSW=per_sample_weights is not None,
        SPLIT_HOT=packed.split_hot,
        REMAP=do_remap,
        EVICT=config.evict,
        NUM_STAGES=config.num_stages,
        BAG_MAJOR=config.order == "bag",
        PREFETCH=config.prefetch,
        EARLY_OFFSETS=early_offsets,
        **kwargs,
    )
