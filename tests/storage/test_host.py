"""Host arena and row layout: exact sizes, 128-byte alignment, chunked loads, release."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from recserve.config import TableConfig, row_bytes
from recserve.embedding.backend import TorchBackend, dequantize_rowwise
from recserve.storage import host as host_mod
from recserve.storage.host import ROW_ALIGN, HostArena, HostTables, host_bytes, host_row_layout


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "int8"])
@pytest.mark.parametrize("dim", [1, 4, 16, 24, 32, 33, 64, 100, 128, 257])
def test_layout_rows_are_whole_aligned_lines(dtype: str, dim: int) -> None:
    lay = host_row_layout(dim, dtype, 10, base=3 * ROW_ALIGN)
    assert lay.stride % ROW_ALIGN == 0 and lay.base % ROW_ALIGN == 0
    assert lay.stride - lay.row_bytes < ROW_ALIGN  # no more padding than needed
    assert lay.row_bytes <= lay.copy_bytes <= lay.stride and lay.copy_bytes % 16 == 0
    if dtype == "int8":
        assert lay.scale_off % 4 == 0 and lay.scale_off >= dim
        assert lay.row_bytes == lay.scale_off + 8
    else:
        assert lay.row_bytes == row_bytes(dim, dtype)
    with pytest.raises(ValueError):
        host_row_layout(dim, dtype, 10, base=64)


def test_hbm_layout_is_16_byte_aligned() -> None:
    lay = host_row_layout(5, "fp32", 7, base=32, align=16)
    assert lay.stride == 32 and lay.nbytes == 7 * 32


def test_arena_exact_size_and_alignment() -> None:
    arena = HostArena(1000, register=False)
    assert arena.nbytes == 1024  # rounded to 128, not to a power of two of the request
    assert arena.address % (2 << 20) == 0
    t = arena.tensor(torch.float32)
    assert t.numel() == 256 and t.data_ptr() == arena.address
    assert isinstance(arena.kernel_arg(torch.float32), torch.Tensor)
    arena.release()
    assert not arena.alive
    with pytest.raises(host_mod.HostMemoryError):
        arena.tensor()


def test_arena_release_with_live_view_keeps_memory_valid() -> None:
    arena = HostArena(4096, register=False)
    view = arena.tensor(torch.int32)
    view.fill_(7)
    arena.release()
    assert int(view.sum()) == 7 * 1024  # the mapping goes with the last view


def _tables() -> tuple[TableConfig, ...]:
    return (
        TableConfig("a", 37, 24, dtype="fp32"),
        TableConfig("b", 11, 40, dtype="fp16"),
        TableConfig("c", 5, 16, dtype="bf16"),
        TableConfig("d", 9, 12, dtype="int8"),
    )


def test_every_row_starts_on_128_bytes_and_round_trips() -> None:
    tables = _tables()
    ht = HostTables(tables, register=False)
    assert ht.nbytes == host_bytes(tables) and ht.arena.nbytes == ht.nbytes
    for i, t in enumerate(tables):
        view = ht.row_view(i)
        assert view.stride(0) % ROW_ALIGN == 0
        assert (view.data_ptr() - ht.arena.address) % ROW_ALIGN == 0
        w = torch.randn(t.num_rows, t.dim)
        ht.load_table(i, w)
        got = ht.dense_weight(i)
        if t.dtype == "fp32":
            assert torch.equal(got, w)
        elif t.dtype == "int8":
            assert (got - w).abs().max() <= (w.amax(1) - w.amin(1)).max() / 255
        else:
            assert torch.allclose(got, w, rtol=1e-2, atol=1e-2)
    # Writing one table never touches another.
    before = ht.dense_weight(0).clone()
    ht.load_table(1, torch.zeros(11, 40))
    assert torch.equal(ht.dense_weight(0), before)


def test_chunked_load_has_no_full_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_mod, "_LOAD_CHUNK_BYTES", 64)  # 2 rows of 8 floats per chunk
    t = TableConfig("a", 13, 8)
    ht = HostTables((t,), register=False)
    assert len(ht.chunks(0)) == 7
    w = torch.randn(13, 8)
    ht.load_table(0, w)
    assert torch.equal(ht.dense_weight(0), w)


def test_load_safetensors_streams_torch_backend_tables(tmp_path: Path) -> None:
    tables = _tables()
    ref = TorchBackend(tables)
    ref.reset_parameters(torch.Generator().manual_seed(3))
    state = {f"sparse.backend.{k}": v.contiguous() for k, v in ref.state_dict().items()}
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    ht = HostTables(tables, register=False)
    keys = {
        i: (
            f"sparse.backend.weights.{i}",
            f"sparse.backend.scale_bias_{i}" if t.dtype == "int8" else None,
        )
        for i, t in enumerate(tables)
    }
    ht.load_safetensors(path, keys)
    for i, t in enumerate(tables):
        if t.dtype == "int8":
            sb = ref.scale_bias(i)
            assert sb is not None
            assert torch.equal(ht.codes(i), ref.weights[i])
            assert torch.equal(ht.dense_weight(i), dequantize_rowwise(ref.weights[i], sb))
        else:
            assert torch.equal(ht.codes(i), ref.weights[i].detach())
    with pytest.raises(ValueError, match="no tensor"):
        ht.load_safetensors(path, {0: ("missing", None)})


def test_lent_arena_is_not_released_by_tables() -> None:
    arena = HostArena(1 << 16, register=False)
    ht = HostTables((TableConfig("a", 10, 8),), arena=arena)
    ht.release()
    assert arena.alive
    with pytest.raises(ValueError, match="arena holds"):
        HostTables((TableConfig("a", 10_000, 8),), arena=arena)
    arena.release()


@pytest.mark.gpu
def test_registered_arena_is_device_addressable() -> None:
    arena = HostArena(1 << 20)
    assert arena.registered and arena.device_address == arena.address
    src = arena.tensor(torch.float32)
    src.copy_(torch.arange(src.numel(), dtype=torch.float32))
    assert src.is_pinned()
    dev = src.to("cuda", non_blocking=True)
    assert torch.equal(dev.cpu(), src)
    arena.release()
