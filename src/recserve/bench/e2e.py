"""End-to-end inference: recserve's GPU pipeline against PyTorch eager, per model and batch.

PyTorch eager is the model with one ``F.embedding_bag`` per table (fp32 rows) and the same
dense layers run op by op, inputs copied with a plain ``.to(device)``. recserve is the same
weights behind the table-batched Triton backend, run by :class:`~recserve.pipeline.GPUPipeline`
(pinned async copies, the whole forward, embedding launch included, replayed as one CUDA graph
per batch-size bucket). Both are timed from host tensors to scores on the device, over rotating
batches; the embedding stage is also timed alone on device-resident inputs, giving each side's
embedding share. Predictions are compared.

Two more recserve variants are timed beside it: the dense part alone graphed (the embedding
launch issued from Python each batch, what the whole-forward graph saves), and mixed precision
(fp16 rows, dense part under bf16 autocast), with its difference in predictions reported.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from recserve.loadgen.synthetic import QueryFactory
from recserve.models import build_model
from recserve.models.base import RecModel
from recserve.pipeline import GPUPipeline, triton_model
from recserve.types import Batch

BATCHES: tuple[int, ...] = (64, 256, 1024, 4096)


def _time_ms(fn: Callable[[int], object], iters: int, warmup: int = 3, rounds: int = 5) -> float:
    """Milliseconds per call of ``fn(i)``: the median over ``rounds`` rounds of back-to-back
    calls (synchronised at each round's ends only), so a rare stall of the shared host (a
    page fault, another process) does not decide a case."""
    for i in range(warmup):
        fn(i)
    _sync()
    per_round = max(1, iters // rounds)
    times = []
    for r in range(rounds):
        start = time.perf_counter()
        for i in range(r * per_round, (r + 1) * per_round):
            fn(i)
        _sync()
        times.append((time.perf_counter() - start) * 1e3 / per_round)
    return statistics.median(times)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _measure(
    eager: RecModel,
    fast: RecModel,
    pipes: Sequence[GPUPipeline],
    host: list[Batch],
    dev: list[Batch],
    iters: int,
    device: torch.device,
    warmup: int = 3,
    rounds: int = 5,
) -> tuple[float, ...]:
    """Times (ms): eager and each pipeline from host inputs, eager and recserve from device
    inputs, embeddings only (eager, recserve)."""
    k = len(host)
    pipe = pipes[0]

    def ms(fn: Callable[[int], object]) -> float:
        return _time_ms(fn, iters, warmup, rounds)

    return (
        ms(lambda i: eager(host[i % k].to(device))),
        *(ms(lambda i, p=p: p(host[i % k])) for p in pipes),
        ms(lambda i: eager(dev[i % k])),
        ms(lambda i: pipe(dev[i % k])),
        ms(lambda i: eager.sparse(dev[i % k].sparse)),
        ms(lambda i: fast.sparse(dev[i % k].sparse)),
    )


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / |b| over all predictions (probabilities are > 0)."""
    return float(((a.double() - b.double()).abs() / b.double().abs().clamp_min(1e-12)).max())


@torch.inference_mode()
def bench_model(
    name: str,
    batches: Sequence[int],
    iters: int,
    preset: str,
    device: torch.device,
    ids: str = "zipf:1.05",
    distinct: int = 2,
    log: Callable[[str], None] = print,
    warmup: int = 3,
    rounds: int = 5,
) -> list[dict[str, Any]]:
    t0 = time.perf_counter()
    eager = build_model(name, preset, device=device, seed=0)
    fast = triton_model(eager)
    pipe = GPUPipeline(fast, buckets=batches)
    dense_only = GPUPipeline(fast, buckets=batches, full_graph=False)
    mixed = GPUPipeline(triton_model(eager, "fp16"), buckets=batches, autocast=torch.bfloat16)
    queries = QueryFactory(eager.config, ids, seed=1)
    rows = []
    for b in batches:
        host: list[Batch] = [queries.make(b) for _ in range(distinct)]
        for h in host:
            h.sparse.key_offsets()
        dev = [h.to(device) for h in host]
        refs = [eager(d) for d in dev]
        diff = max(max_rel_diff(pipe(h), r) for h, r in zip(host, refs, strict=True))
        diff_dense = max(max_rel_diff(dense_only(h), r) for h, r in zip(host, refs, strict=True))
        mixed_out = [mixed(h) for h in host]
        mixed_abs = max(float((m - r).abs().max()) for m, r in zip(mixed_out, refs, strict=True))
        mixed_rel = max(max_rel_diff(m, r) for m, r in zip(mixed_out, refs, strict=True))
        t = _measure(
            eager, fast, (pipe, dense_only, mixed), host, dev, iters, device, warmup, rounds
        )
        eager_ms, fast_ms, dense_ms, mixed_ms, eager_dev_ms, fast_dev_ms, eager_emb_ms = t[:7]
        fast_emb_ms = t[7]
        row = {
            "model": name,
            "batch": b,
            "ids": ids,
            "eager_ms": eager_ms,
            "recserve_ms": fast_ms,
            "eager_items_per_s": b * 1e3 / eager_ms,
            "recserve_items_per_s": b * 1e3 / fast_ms,
            "speedup": eager_ms / fast_ms,
            "eager_device_ms": eager_dev_ms,
            "recserve_device_ms": fast_dev_ms,
            "speedup_device_inputs": eager_dev_ms / fast_dev_ms,
            "eager_embedding_ms": eager_emb_ms,
            "recserve_embedding_ms": fast_emb_ms,
            "eager_embedding_share": min(1.0, eager_emb_ms / eager_dev_ms),
            "recserve_embedding_share": min(1.0, fast_emb_ms / fast_dev_ms),
            "max_rel_diff": max(diff, diff_dense),
            "dense_graph_only_ms": dense_ms,
            "whole_graph_gain": dense_ms / fast_ms,
            "mixed_ms": mixed_ms,
            "mixed_speedup": eager_ms / mixed_ms,
            "mixed_max_abs_diff": mixed_abs,
            "mixed_max_rel_diff": mixed_rel,
        }
        rows.append(row)
        log(
            f"{name:>10} B={b:<5} eager {eager_ms:7.3f} ms  recserve {fast_ms:7.3f} ms  "
            f"x{row['speedup']:.2f} (device inputs x{row['speedup_device_inputs']:.2f}, "
            f"dense graph only x{eager_ms / dense_ms:.2f}, mixed x{row['mixed_speedup']:.2f})  "
            f"emb {row['eager_embedding_share']:.0%}/{row['recserve_embedding_share']:.0%}  "
            f"diff {row['max_rel_diff']:.1e} (mixed {mixed_abs:.1e} abs)"
        )
    eager = fast = pipe = dense_only = mixed = None  # type: ignore[assignment]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log(f"{name}: {time.perf_counter() - t0:.1f} s")
    return rows


def summarise(rows: list[dict[str, Any]], min_batch: int = 256) -> dict[str, Any]:
    big = [r for r in rows if r["batch"] >= min_batch]
    speedups = [r["speedup"] for r in big]
    return {
        "e2e_speedup_vs_eager_min": min(speedups) if speedups else None,
        "e2e_speedup_vs_eager_geomean": (
            math.exp(sum(math.log(s) for s in speedups) / len(speedups)) if speedups else None
        ),
        "e2e_speedup_device_inputs_min": min(
            (r["speedup_device_inputs"] for r in big), default=None
        ),
        "e2e_max_rel_diff": max((r["max_rel_diff"] for r in rows), default=None),
        "e2e_mixed_speedup_vs_eager_min": min((r["mixed_speedup"] for r in big), default=None),
        "e2e_mixed_max_abs_diff": max((r["mixed_max_abs_diff"] for r in rows), default=None),
        "whole_graph_gain_min": min((r["whole_graph_gain"] for r in big), default=None),
    }


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), sharex=True)
    for ax, name in zip(axes.flat, models, strict=False):
        mine = [r for r in rows if r["model"] == name]
        bs = [r["batch"] for r in mine]
        ax.plot(bs, [r["eager_items_per_s"] for r in mine], "o-", label="PyTorch eager")
        ax.plot(bs, [r["recserve_items_per_s"] for r in mine], "s-", label="recserve")
        mixed = [b * 1e3 / r["mixed_ms"] for b, r in zip(bs, mine, strict=True)]
        ax.plot(bs, mixed, "^--", label="recserve, mixed precision")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("batch")
        ax.set_ylabel("items/s")
        ax.grid(True, alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle("End-to-end inference, paper shapes, zipf 1.05 ids")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
