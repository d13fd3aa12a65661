"""``recserve bench serve``: DeepRecSched's tuned schedules against static ones, per model.

For each model: the static schedules (CPU-only whole queries, DeepRecSys's fixed b = 32 and 64,
GPU-only with every query alone), the paper's hill climb over b (CPU-only) and then T and the
coalescing delay (CPU + GPU), and recserve's guided search, all at the medium p95 target;
low and high targets are read from the same probes. Also the engine's overhead against a tight
loop over the model, and the workers' resident memory. Writes JSON (``summary`` first) and a
PNG of p95 against offered load.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from recserve.bench import common
from recserve.bench.common import git_commit, machine_speed
from recserve.engine import EngineConfig, RecEngine
from recserve.engine.calibrate import calibrate
from recserve.engine.config import SchedConfig, default_cpu_workers
from recserve.engine.deeprecsched import (
    STATIC_CPU,
    STATIC_GPU,
    ProbePlan,
    default_grids,
    engine_measure,
    qps_at,
    saturation_qps,
)
from recserve.engine.engine import default_ids_per_item
from recserve.engine.gpu_process import runner_buckets
from recserve.engine.query_memory import QueryMemory
from recserve.engine.simulate import simulated_measure
from recserve.engine.tuner import (
    VERIFY_SEARCH,
    ConfigResult,
    Grids,
    LoadSearch,
    Measure,
    TuneResult,
    guided_search,
    hill_climb,
)
from recserve.loadgen.driver import QueryPool
from recserve.loadgen.metrics import LatencyTarget, RunResult
from recserve.loadgen.sizes import QuerySizes
from recserve.loadgen.synthetic import QueryFactory
from recserve.models.base import RecModel
from recserve.models.registry import MODEL_NAMES, PRESETS, build_model
from recserve.pipeline import GPUPipeline, runner_model
from recserve.types import Batch

TARGETS_MS: dict[str, tuple[float, float, float]] = {
    "mt-wnd": (10.0, 21.0, 40.0),
    "dien": (15.0, 30.0, 60.0),
}
"""p95 targets (low, medium, high) per WORKLOADS.md; every other model: 5 / 10 / 25 ms."""
QUICK_MODELS = ("dlrm-rmc1", "ncf")


def targets_for(model: str) -> dict[str, LatencyTarget]:
    low, medium, high = TARGETS_MS.get(model, (5.0, 10.0, 25.0))
    return {
        k: LatencyTarget(v / 1e3) for k, v in (("low", low), ("medium", medium), ("high", high))
    }


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="tuned (DeepRecSched) vs static schedules under p95 targets")
    p.add_argument(
        "--models", nargs="+", choices=MODEL_NAMES, default=None, help="default: all eight"
    )
    p.add_argument(
        "--preset", choices=PRESETS, default=None, help="default: paper (small with --quick)"
    )
    p.add_argument("--quick", action="store_true", help="a small CPU check of the whole pipeline")
    p.add_argument("--workers", type=int, default=None, help="CPU workers (default: cores - 1)")
    p.add_argument("--device", default="auto", help="GPU runner: auto, cuda, cpu (stand-in), none")
    p.add_argument(
        "--gpu-runner",
        choices=("process", "thread"),
        default="process",
        help="the GPU runner's host work in a process of its own (default) or in threads of "
        "the engine's (the first model also measures the other for comparison)",
    )
    p.add_argument(
        "--queries-in",
        choices=("shared", "heap"),
        default="shared",
        help="where the replayed queries live: a shared file the GPU runner reads in place "
        "(default; batches of several are joined on the device) or this process's heap "
        "(the engine copies each into the runner's slot)",
    )
    p.add_argument("--sizes", default="production", help="query sizes (see recserve tune --help)")
    p.add_argument("--ids", default="zipf:1.05", help="id distribution per table")
    p.add_argument("--probe-seconds", type=float, default=None, help="arrivals per probe")
    p.add_argument("--min-queries", type=int, default=None, help="fewest queries per probe")
    p.add_argument(
        "--budget-s", type=float, default=None, help="wall-clock budget; phases past it are skipped"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="folder (default benchmarks/results/<device>)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        metavar="JSON",
        help="combine runs over disjoint models (each a bench_serve.json) into one report "
        "with the summary over all of them, written to --out; measures nothing",
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="with --merge: runs may overlap; each model is taken from the last run that has it",
    )
    p.set_defaults(func=run)


def device_slug() -> str:
    return common.device_slug(common.device_label())


def merge(
    paths: list[Path], out_dir: Path, console: Console, replace: bool = False
) -> dict[str, Any]:
    """One report from runs over disjoint models (same device): models concatenated, summary
    recomputed over all; device, dates and commits taken from the parts. With ``replace``,
    runs may overlap: a model measured more than once is taken from the last run given that
    has it (the earlier records are dropped, and ``merged_from`` says which run each model
    came from)."""
    parts = [json.loads(p.read_text()) for p in paths]
    names = [m["model"] for part in parts for m in part["models"]]
    if len(set(names)) != len(names) and not replace:
        raise ValueError(f"the runs overlap: {names} (--replace takes each from the last run)")
    source = {m["model"]: i for i, part in enumerate(parts) for m in part["models"]}
    models = []
    for i, part in enumerate(parts):
        kept = [m for m in part["models"] if source[m["model"]] == i]
        part["models"] = kept
        models += kept
    parts = [part for part in parts if part["models"]]
    devices = {part["summary"].get("device") for part in parts}
    if len(devices) != 1:
        raise ValueError(f"runs from different devices: {sorted(map(str, devices))}")
    report = dict(parts[0])
    report["models"] = models
    summary = summarize(models)
    summary["device"] = devices.pop()
    summary["date"] = max(part["summary"]["date"] for part in parts)
    commits = list(dict.fromkeys(str(part["summary"].get("commit")) for part in parts))
    summary["commit"] = commits[0] if len(commits) == 1 else ",".join(commits)
    summary["merged_from"] = [
        {"models": [m["model"] for m in part["models"]], **{k: part["summary"].get(k) for k in
         ("date", "commit")}, "wall_s": part.get("wall_s")}
        for part in parts
    ]  # fmt: skip
    report["summary"] = summary
    report["wall_s"] = sum(part.get("wall_s") or 0 for part in parts)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_serve.json").write_text(json.dumps(report, indent=2, default=float))
    plot(models, out_dir / "bench_serve.png")
    print_report(console, report)
    console.print(f"wrote {out_dir / 'bench_serve.json'} and bench_serve.png")
    return report


def run(args: argparse.Namespace) -> int:
    if args.merge:
        out = args.out or Path("benchmarks/results") / device_slug()
        merge(args.merge, out, Console(), replace=args.replace)
        return 0
    quick = args.quick
    models = args.models or (list(QUICK_MODELS) if quick else list(MODEL_NAMES))
    opts = {
        "preset": args.preset or ("small" if quick else "paper"),
        "workers": args.workers
        if args.workers is not None
        else (1 if quick else default_cpu_workers()),
        "device": "cpu" if quick and args.device == "auto" else args.device,
        "gpu_runner": args.gpu_runner,
        "queries_in": args.queries_in,
        "sizes": args.sizes,
        "ids": args.ids,
        "plan": ProbePlan(
            seconds=args.probe_seconds or (0.3 if quick else 0.4),
            min_queries=args.min_queries or (120 if quick else 200),
            seed=args.seed,
        ),
        "seed": args.seed,
    }
    budget = args.budget_s or (240.0 if quick else 420.0)
    out_dir = args.out or Path("benchmarks/results") / device_slug()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "bench_serve_quick" if quick else "bench_serve"
    console = Console()
    began = time.monotonic()
    report: dict[str, Any] = {
        "summary": {},
        "mode": "quick (CPU check, not a GPU result)" if quick else "full",
    }
    report["settings"] = {
        k: (v.__dict__ if isinstance(v, ProbePlan) else v) for k, v in opts.items()
    }
    report["settings"]["budget_s"] = budget
    report["reduced"] = REDUCED
    report["models"] = []
    for i, name in enumerate(models):
        share = (budget - (time.monotonic() - began)) / (len(models) - i)
        console.print(f"[bold]{name}[/bold]: {share:.0f} s of budget")
        speed = machine_speed()
        record = bench_model(name, opts, time.monotonic() + share, first=i == 0, console=console)
        record["machine_speed"] = {"before": speed, "after": machine_speed()}
        budget += record.get("one_off_s", 0.0)  # one-off measurements take no model's share
        report["models"].append(record)
        report["summary"] = summarize(report["models"])
        (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2, default=float))
    report["wall_s"] = round(time.monotonic() - began, 1)
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2, default=float))
    plot(report["models"], out_dir / f"{stem}.png")
    print_report(console, report)
    console.print(f"wrote {out_dir / (stem + '.json')} and {stem}.png")
    return 0


REDUCED = [
    "one probe per offered load, 0.4 s of arrivals (at least 200 queries) per probe",
    "load searches stop within 5% (hill climb) of the limit",
    "low and high targets are read from the probes taken for the medium target, not re-tuned",
    "the GPU-only baseline is searched twice, before and after the climbs; the better counts",
    "resident memory at 1 worker and at all workers, for the first model only",
    "the CPU-path engine overhead is measured with 1 worker, on the first model only",
    "phases past a model's share of the time budget are skipped (listed in 'skipped'); the "
    "first model's one-off measurements (CPU-path overhead, memory, the other GPU runner) are "
    "not taken from its share",
]


def tight_loop_qps(
    model: Callable[[Batch], torch.Tensor],
    batches: list[Batch],
    device: torch.device,
    seconds: float,
    move: bool = True,
) -> float:
    """Queries per second of ``model`` called back to back on the pool's batches (copy in,
    forward, copy out), the baseline for the engine's overhead. ``move=False`` hands the host
    batches to ``model`` as they are (a pipeline that copies its own inputs)."""

    def call(b: Batch) -> torch.Tensor:
        return model(b.to(device, non_blocking=True) if move else b).cpu()

    with torch.inference_mode():
        for b in batches[:4]:
            call(b)
        began, n = time.perf_counter(), 0
        while time.perf_counter() - began < seconds:
            call(batches[n % len(batches)])
            n += 1
    return n / (time.perf_counter() - began)


def runner_baseline(model: RecModel, engine: RecEngine) -> Callable[[Batch], torch.Tensor]:
    """What the engine's GPU runner calls, outside the engine: the same device model and
    pipeline buckets, every graph captured before timing (a separate copy in this process)."""
    config = engine.engine_config
    assert engine.device is not None
    top = max(config.max_query_items, config.sched.gpu_max_batch)
    ids = config.max_ids_per_item or default_ids_per_item(model.config)
    served, pipeline = runner_model(
        model, engine.device, config.gpu_kernels, runner_buckets(top), ids
    )
    return pipeline if pipeline is not None else served.eval()


def bench_model(
    name: str, opts: dict[str, Any], deadline: float, first: bool, console: Console
) -> dict[str, Any]:
    began = time.monotonic()
    targets = targets_for(name)
    medium = targets["medium"]
    rec: dict[str, Any] = {
        "model": name,
        "targets_ms": {k: t.seconds * 1e3 for k, t in targets.items()},
        "skipped": [],
    }
    model = build_model(name, opts["preset"], seed=opts["seed"])
    factory = QueryFactory(model.config, opts["ids"], seed=opts["seed"])
    pool = QueryPool(factory, QuerySizes.parse(opts["sizes"]), seed=opts["seed"])
    rec["build_s"] = round(time.monotonic() - began, 2)
    one_off = 0.0  # seconds of the first model's one-off measurements: not from its share
    if first:
        t0 = time.monotonic()
        rec["cpu_overhead"] = cpu_overhead(model, pool)
        console.print(f"  CPU path: {rec['cpu_overhead']}")
        one_off += time.monotonic() - t0
    workers = opts["workers"]
    t0 = time.monotonic()
    engine = RecEngine(
        model,
        EngineConfig(
            cpu_workers=workers,
            device=opts["device"],
            queue_capacity=512,
            gpu_runner=opts["gpu_runner"],
        ),
    )
    rec["engine_start_s"] = round(time.monotonic() - t0, 2)
    memory = None
    try:
        has_gpu = engine.device is not None
        if has_gpu and opts["queries_in"] == "shared":
            memory = QueryMemory(engine, pool.batches)
            if memory.shared:  # the tight-loop baseline reads the same page-locked memory
                pool.batches = memory.batches
                memory.pin()
        rec["queries_in"] = "shared" if memory is not None and memory.shared else "heap"
        rec["runner_device"] = str(engine.device) if has_gpu else "none"
        if first and engine.cpu_pool is not None:
            t0 = time.monotonic()
            rec["memory"] = worker_memory(engine, model)
            one_off += time.monotonic() - t0
        if has_gpu:
            device = engine.device
            assert device is not None
            rec["runner_overhead"] = runner_overhead(model, engine, pool)
            console.print(f"  GPU runner ({opts['gpu_runner']}): {rec['runner_overhead']}")
            if first:  # the other runner, for comparison (an engine of its own, GPU only)
                t0 = time.monotonic()
                other = "thread" if opts["gpu_runner"] == "process" else "process"
                config = EngineConfig(
                    cpu_workers=0, device=str(device), queue_capacity=512, gpu_runner=other
                )
                with RecEngine(model, config) as alone:
                    rec[f"runner_overhead_{other}"] = runner_overhead(model, alone, pool)
                console.print(f"  GPU runner ({other}): {rec[f'runner_overhead_{other}']}")
                one_off += time.monotonic() - t0
        if first:
            rec["one_off_s"] = round(one_off, 1)
            deadline += one_off
        probe = engine_measure(engine, pool, opts["plan"], medium)
        measure = timed(probe, deadline)
        # when a GPU climb follows, the CPU-only climb must end by CPU_SHARE of the model's
        # remaining time (CPU probes at tens of QPS are slow, and left wnd no GPU climb)
        cpu_end = time.monotonic() + CPU_SHARE * max(0.0, deadline - time.monotonic())
        measure_cpu = timed(probe, cpu_end if has_gpu else deadline)
        start = 0.5 * saturation_qps(engine, pool, STATIC_CPU["cpu-whole"], seconds=0.5)
        search = LoadSearch(rel_tol=0.05)
        statics = {**STATIC_CPU, **(STATIC_GPU if has_gpu else {})}
        grids = default_grids(engine.engine_config.max_query_items, gpu=has_gpu)
        found: dict[str, ConfigResult] = {}
        climbs: list[TuneResult] = []
        try:
            for label, config in statics.items():
                found[label] = search.run(measure, config, medium, start)
            b_only = Grids(sub_batch_size=grids.sub_batch_size)
            known = {r.config: r for r in found.values()}  # measured once, reused by the climb
            try:
                cpu_climb = hill_climb(
                    measure_cpu, medium, SchedConfig(), b_only, start, search, known=known,
                    stop_on=(OutOfTime,),
                )  # fmt: skip
            except OutOfTime as err:  # not one new value measured: the best static stands
                best_cpu = max((found[k] for k in STATIC_CPU), key=lambda r: r.qps)
                cpu_climb = TuneResult("hill_climb", medium, best_cpu, [], 0.0, stopped=str(err))
            climbs.append(cpu_climb)
            rec["hill_climb_cpu"] = climbs[0].to_dict()
            if climbs[0].stopped:
                rec["skipped"].append(f"CPU climb: {climbs[0].stopped}")
            if has_gpu:
                gpu_knobs = Grids(
                    sub_batch_size=(),
                    gpu_threshold=grids.gpu_threshold,
                    gpu_max_batch=grids.gpu_max_batch,
                    gpu_max_delay=grids.gpu_max_delay,
                )
                gpu_start = max(climbs[0].best.qps, found["gpu-only"].qps, start)
                climbs.append(
                    hill_climb(
                        measure,
                        medium,
                        SchedConfig(),
                        gpu_knobs,
                        gpu_start,
                        search,
                        incumbent=climbs[0].best,
                    )
                )
                rec["hill_climb_gpu"] = climbs[1].to_dict()
                # The baseline again, minutes later: a host that slowed down while the baseline
                # ran would inflate every ratio to it, and noise only ever slows a run down.
                first = found["gpu-only"]
                again = search.run(measure, first.config, medium, max(first.qps, start))
                rec["gpu_only_repeat"] = {"first_qps": first.qps, "again_qps": again.qps}
                if again.qps > first.qps:
                    found["gpu-only"] = again
            rec["guided"] = run_guided(engine, factory, pool, measure, medium, grids, start, climbs)
        except OutOfTime as err:
            rec["skipped"].append(str(err))
            console.print(f"  [yellow]out of time: {err}[/yellow]")
        rec["by_target"] = by_target(targets, found, climbs)
        rec["statics"] = {k: v.to_dict() for k, v in found.items()}
    finally:
        engine.close()
        if memory is not None:
            memory.close()
    rec["wall_s"] = round(time.monotonic() - began, 1)
    return rec


SATURATION_OUTSTANDING = (4, 16)
"""Queries kept in flight when the engine's GPU throughput is measured against a tight loop."""


def runner_overhead(model: RecModel, engine: RecEngine, pool: QueryPool) -> dict[str, Any]:
    """The engine serving every query alone on the GPU at saturation vs the runner's own model
    called back to back on the same queries."""
    assert engine.device is not None
    device = engine.device
    baseline = runner_baseline(model, engine)
    before = engine.stats()
    by_level: dict[int, float] = {}

    def served() -> float:
        # saturation: the best of a few queries in flight and of many (with few, the runner
        # can wait between batches for the loop's hand-offs)
        for level in SATURATION_OUTSTANDING:
            qps = saturation_qps(
                engine, pool, STATIC_GPU["gpu-only"], seconds=0.4, outstanding=level
            )
            by_level[level] = max(by_level.get(level, 0.0), qps)
        return max(by_level.values())

    result: dict[str, Any] = overhead(
        lambda: tight_loop_qps(
            baseline, pool.batches, device, 0.4, move=not isinstance(baseline, GPUPipeline)
        ),
        served,
    )
    result["engine_qps_by_outstanding"] = {str(k): v for k, v in by_level.items()}
    after = engine.stats()
    batches = after.get("gpu_batches", 0) - before.get("gpu_batches", 0)
    if batches > 0 and "gpu_runner_host_s" in after:  # the process runner reports its times
        names = {"gpu_runner_host_s": "runner_host_ms_per_batch",
                 "gpu_runner_device_wait_s": "runner_device_wait_ms_per_batch"}  # fmt: skip
        for key, name in names.items():
            result[name] = (after[key] - before[key]) / batches * 1e3
    return result


CPU_SHARE = 0.5
"""Of a model's time after its one-off measurements, the part by whose end its CPU-only climb
stops when a GPU climb follows (the static baselines count against it but always run)."""


class OutOfTime(RuntimeError):
    """The model's share of the time budget is spent; its remaining phases are skipped."""


def timed(measure: Measure, deadline: float) -> Measure:
    """``measure``, refusing to start a probe after ``deadline`` (``time.monotonic``)."""

    def bounded(config: SchedConfig, qps: float) -> RunResult:
        if time.monotonic() > deadline:
            raise OutOfTime(f"budget spent before probing {config.label()} at {qps:.0f} QPS")
        return measure(config, qps)

    return bounded


def cpu_overhead(model: torch.nn.Module, pool: QueryPool) -> dict[str, float]:
    """One worker process serving whole queries at saturation vs the same model called back to
    back by one thread of this process."""
    threads = torch.get_num_threads()
    with RecEngine(model, EngineConfig(cpu_workers=1, device="none", queue_capacity=64)) as engine:

        def tight() -> float:
            torch.set_num_threads(1)
            try:
                return tight_loop_qps(model, pool.batches, torch.device("cpu"), 0.5)
            finally:
                torch.set_num_threads(threads)

        def served() -> float:
            return saturation_qps(engine, pool, STATIC_CPU["cpu-whole"], seconds=0.5, outstanding=3)

        return overhead(tight, served)


def overhead(
    tight: Callable[[], float], served: Callable[[], float], rounds: int = 3
) -> dict[str, float]:
    """Best of ``rounds`` alternating measurements of each (noise on a shared machine only ever
    slows a run down), and the fraction of the tight loop's QPS the engine loses."""
    tight_qps, served_qps = 0.0, 0.0
    for _ in range(rounds):
        tight_qps = max(tight_qps, tight())
        served_qps = max(served_qps, served())
    return {
        "tight_loop_qps": tight_qps,
        "engine_qps": served_qps,
        "frac": 1 - served_qps / tight_qps,
    }


def worker_memory(engine: RecEngine, model: torch.nn.Module) -> dict[str, Any]:
    """RSS and PSS of the workers after each has read every weight once."""
    pool = engine.cpu_pool
    assert pool is not None
    pool.touch_weights()
    mem = pool.memory()
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {
        "workers": len(mem),
        "model_bytes": nbytes,
        "rss_per_worker_bytes": [m["rss"] for m in mem],
        "pss_total_bytes": sum(m["pss"] for m in mem),
        "rss_total_bytes": sum(m["rss"] for m in mem),
        "note": "RSS counts the shared weight pages in every worker; PSS divides them among the "
        "workers, so PSS total ~ one copy of the weights plus per-process overhead",
    }


def run_guided(
    engine: RecEngine,
    factory: QueryFactory,
    pool: QueryPool,
    measure: Measure,
    target: LatencyTarget,
    grids: Grids,
    start: float,
    climbs: list[TuneResult],
) -> dict[str, Any]:
    has_gpu = engine.device is not None
    workers = engine.cpu_pool.num_workers if engine.cpu_pool is not None else 0
    cpu_sizes = [b for b in grids.sub_batch_size if b is not None] + [int(pool.sizes.max())]
    gpu_sizes = (64, 256, 1024) if has_gpu else ()
    cal = calibrate(engine, factory, cpu_sizes, gpu_sizes)
    rng = np.random.default_rng(1)
    sizes = pool.sizes[rng.integers(0, len(pool), 1000)]
    predict = simulated_measure(cal.service, workers, sizes, seed=2, capacity=512)
    result = guided_search(
        measure,
        predict,
        target,
        SchedConfig(),
        grids,
        start,
        calibration_queries=cal.queries,
        calibration_seconds=cal.seconds,
    )
    climb_qps = max(c.best.qps for c in climbs)
    climb_queries = sum(c.queries for c in climbs)
    climb_seconds = sum(c.seconds for c in climbs)
    out = result.to_dict()
    out["service_model"] = {
        "cpu": cal.service.cpu.to_dict(),
        "gpu": cal.service.gpu.to_dict() if cal.service.gpu else None,
        "loop_s_per_cpu_sub_batch": cal.service.host_cpu,
        "loop_s_per_gpu_batch": cal.service.host_gpu,
    }
    out["vs_hill_climb"] = {
        "qps_ratio": result.best.qps / climb_qps if climb_qps else None,
        "queries_ratio": result.queries / climb_queries if climb_queries else None,
        "seconds_ratio": result.seconds / climb_seconds if climb_seconds else None,
    }
    climb_best = max(climbs, key=lambda c: c.best.qps).best
    out["rematch"] = rematch(measure, target, climb_best, result.best)
    return out


REMATCH_ROUNDS = 2


def rematch(
    measure: Measure,
    target: LatencyTarget,
    climbed: ConfigResult,
    guided: ConfigResult,
    rounds: int = REMATCH_ROUNDS,
) -> dict[str, Any]:
    """The climb's best and the guided search's best measured again, alternately, ``rounds``
    times each. The searches measured them minutes apart, and on a shared host the same
    configuration measured twice can differ by 20% (dlrm-rmc1 at 75fdb5e: 11767 and 9830 QPS
    for b=256, T=0); side by side, whether the guided search found the same or a better
    configuration is a comparison of configurations, not of moments. ``qps_ratio`` compares
    each one's best round; ``qps_ratio_paired`` is the geometric mean of the rounds' ratios
    (each round measures both within a minute), which a single lucky probe moves less. The
    same configuration is not measured again."""
    out: dict[str, Any] = {
        "hill_climb": climbed.config.label(),
        "guided": guided.config.label(),
        "same_config": climbed.config == guided.config,
    }
    if out["same_config"]:
        out["qps_ratio"] = out["qps_ratio_paired"] = 1.0
        return out
    search = VERIFY_SEARCH
    qps: dict[str, list[float]] = {"hill_climb": [], "guided": []}
    try:
        for _ in range(rounds):
            for key, found in (("hill_climb", climbed), ("guided", guided)):
                start = max(found.qps, search.min_qps)
                qps[key].append(search.run(measure, found.config, target, start).qps)
    except OutOfTime as err:
        out["stopped"] = str(err)
    out["qps"] = qps
    if qps["hill_climb"] and len(qps["guided"]) == len(qps["hill_climb"]):
        best_climb = max(qps["hill_climb"])
        out["qps_ratio"] = max(qps["guided"]) / best_climb if best_climb else None
        pairs = [(g, c) for g, c in zip(qps["guided"], qps["hill_climb"], strict=True) if g and c]
        if pairs and len(pairs) == len(qps["guided"]):
            out["qps_ratio_paired"] = float(np.exp(np.mean([np.log(g / c) for g, c in pairs])))
    return out


def by_target(
    targets: dict[str, LatencyTarget],
    statics: dict[str, ConfigResult],
    climbs: list[TuneResult],
) -> dict[str, dict[str, float | None]]:
    """Latency-bounded QPS per target and schedule: the medium target's searches, the other
    targets read from the same probes (at their resolution)."""
    out: dict[str, dict[str, float | None]] = {}
    for level, target in targets.items():
        row: dict[str, float | None] = {label: qps_at(r, target) for label, r in statics.items()}
        tried: list[ConfigResult] = []
        for key, climb in zip(("tuned_cpu", "tuned_cpu_gpu"), climbs, strict=False):
            tried += climb.climbed
            if climb.climbed:
                medium = level == "medium"
                row[key] = climb.best.qps if medium else max(qps_at(c, target) for c in tried)
        cpu_statics = [row[k] for k in STATIC_CPU if k in row]
        best_static = max(cpu_statics) if len(cpu_statics) == len(STATIC_CPU) else None
        if "tuned_cpu" in row and best_static:
            row["tuned_vs_best_static_cpu"] = row["tuned_cpu"] / best_static  # type: ignore[operator]
        if "tuned_cpu_gpu" in row and row.get("gpu-only"):
            row["tuned_vs_gpu_only"] = row["tuned_cpu_gpu"] / row["gpu-only"]  # type: ignore[operator]
        out[level] = row
    return out


def summarize(models: list[dict[str, Any]]) -> dict[str, Any]:
    def ratios(key: str) -> list[float | None]:
        return [m["by_target"]["medium"].get(key) for m in models if "by_target" in m]

    cpu = ratios("tuned_vs_best_static_cpu")
    gpu = [r for r in ratios("tuned_vs_gpu_only") if r is not None]
    overheads = [
        m[k]["frac"] for m in models for k in ("cpu_overhead", "runner_overhead") if k in m
    ]
    guided = [m["guided"]["vs_hill_climb"] for m in models if "guided" in m]
    rematched = [
        m["guided"]["rematch"]["qps_ratio"]
        for m in models
        if m.get("guided", {}).get("rematch", {}).get("qps_ratio") is not None
    ]
    paired = [
        m["guided"]["rematch"]["qps_ratio_paired"]
        for m in models
        if m.get("guided", {}).get("rematch", {}).get("qps_ratio_paired") is not None
    ]
    defined = [r for r in cpu if r is not None]
    return {
        "tuned_vs_best_static_cpu_min": min(cpu) if cpu and None not in cpu else None,
        "tuned_vs_best_static_cpu_min_defined": min(defined) if defined else None,
        "tuned_vs_best_static_cpu_undefined": [
            m["model"]
            for m in models
            if "by_target" in m and m["by_target"]["medium"].get("tuned_vs_best_static_cpu") is None
        ],
        "tuned_vs_gpu_only_static_min": min(gpu) if gpu else None,
        "engine_overhead_frac": max(overheads) if overheads else None,
        "guided_qps_vs_hill_climb_min": min((g["qps_ratio"] or 0) for g in guided)
        if guided
        else None,
        "guided_queries_vs_hill_climb_max": max((g["queries_ratio"] or 0) for g in guided)
        if guided
        else None,
        "guided_rematch_qps_vs_hill_climb_min": min(rematched) if rematched else None,
        "guided_rematch_paired_qps_vs_hill_climb_min": min(paired) if paired else None,
        "guided_rematch_missing": [
            m["model"] for m in models if "guided" in m and "rematch" not in m["guided"]
        ],
        "models": [m["model"] for m in models],
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
    }


def plot(models: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(models))
    rows = (len(models) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, m in zip(axes.flat, models, strict=False):
        target = m["targets_ms"]["medium"]
        curves = {label: s for label, s in m.get("statics", {}).items()}
        for key, label in (("hill_climb_cpu", "tuned CPU"), ("hill_climb_gpu", "tuned CPU+GPU")):
            if key in m:
                curves[f"{label} ({m[key]['best']['label']})"] = m[key]["best"]
        for label, res in curves.items():
            top = 3 * target  # failed probes (aborted, or queries lost) are drawn at the top
            pts = sorted(
                (
                    p["offered_qps"],
                    top if p["aborted"] or p["rejected"] or p["failed"] else p["latency_ms"]["p95"],
                )
                for p in res["probes"]
            )
            if not pts:
                continue
            qps = [p[0] for p in pts]
            p95 = [min(p[1], top) if np.isfinite(p[1]) else top for p in pts]
            style = "-" if label.startswith("tuned") else "--"
            ax.plot(qps, p95, style, marker="o", markersize=3, label=label)
        ax.axhline(target, color="k", linewidth=0.8, linestyle=":")
        ax.set_title(f"{m['model']} (p95 target {target:g} ms)", fontsize=9)
        ax.set_xlabel("offered QPS")
        ax.set_ylabel("p95 latency (ms)")
        ax.set_ylim(0, 3 * target)
        if ax.get_legend_handles_labels()[1]:  # a model merged without probes has no curve
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(models) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_report(console: Console, report: dict[str, Any]) -> None:
    for m in report["models"]:
        if "by_target" not in m:
            continue
        table = Table(title=f"{m['model']}: latency-bounded QPS (p95)")
        levels = list(m["by_target"])
        table.add_column("schedule")
        for level in levels:
            table.add_column(f"{level} ({m['targets_ms'][level]:g} ms)", justify="right")
        keys = [k for k in m["by_target"]["medium"] if not k.startswith("tuned_vs")]
        for key in keys:
            table.add_row(key, *(f"{m['by_target'][lv].get(key, 0.0):.1f}" for lv in levels))
        console.print(table)
        if "guided" in m:
            console.print(guided_line(m["guided"]))
    console.print_json(json.dumps(report["summary"], default=float))


def guided_line(guided: dict[str, Any]) -> str:
    """One line on the guided search against the climb: its best, the share of the climb's
    queries it used, and the side-by-side rematch of the two bests."""
    vs = guided["vs_hill_climb"]
    line = f"guided search: {guided['best']['label']} at {guided['qps']:.0f} QPS"
    if vs.get("queries_ratio") is not None:
        line += f", {vs['queries_ratio']:.2f} of the climb's queries"
    match = guided.get("rematch")
    if match is None:
        return line
    if match["same_config"]:
        return line + "; the climb's best configuration too"
    line += f"; side by side with the climb's {match['hill_climb']}"
    if match.get("qps_ratio") is not None:
        line += f": {match['qps_ratio']:.2f}x its QPS"
    if match.get("qps_ratio_paired") is not None:
        line += f" (round by round {match['qps_ratio_paired']:.2f}x)"
    if match.get("stopped"):
        line += f" (stopped: {match['stopped']})"
    return line
