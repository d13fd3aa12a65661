"""The kernel benchmark: ceilings, device checks, the sweep against peers, ablation, summary.

``run(options)`` does everything in one process on one GPU and writes, under ``options.out``:
``kernels.json`` (starting with the ``summary`` object), ``kernels-roofline.png`` and
``kernels-tuned.json`` (the autotuner's configs for this device; copy it to
``src/recserve/kernels/configs/<device>.json`` to ship it) and ``kernels-retuned.json`` (only
the buckets tuned in this run, to merge into a shipped file). Results are written after every
table set, so a run cut short by its time budget still leaves what it measured.

A focused run (``cases`` and ``retune`` patterns) times only some cases of the plan and tunes
chosen buckets again, timing each case with the earlier config too (``recserve_before``),
checks the configs it tuned against the reference and prints a table of the cases.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fnmatch
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import triton

from recserve.bench.common import git_commit
from recserve.kernels.bench import ablation, checks, report
from recserve.kernels.bench.cases import Case, TableSet, model_tables, uniform_tables
from recserve.kernels.bench.ceilings import (
    CEILING_VARIANTS,
    MATCHED_VARIANTS,
    copy_bandwidth,
    launch_floor_us,
    random_row_ceilings,
    size_matched_ceilings,
)
from recserve.kernels.bench.peers import fbgemm_available
from recserve.kernels.bench.plan import SWEEP_TABLES, plan, select_cases, smoke_plan
from recserve.kernels.bench.precompile import CeilingJob, Compiler, PooledJob
from recserve.kernels.bench.sweep import MAX_SETS, TableBench
from recserve.kernels.layout import ALIGN_BYTES, element_size
from recserve.kernels.pooled import PooledConfig
from recserve.kernels.timing import time_us
from recserve.kernels.tuning import (
    KernelTuner,
    ShapeBucket,
    device_slug,
    heuristic_config,
    tile_candidates,
)


@dataclass
class BenchOptions:
    out: Path
    mode: str = "full"
    """``full`` (issue 3's sweep), ``quick`` (a small sweep), ``probe`` (design probe: every
    tile candidate on representative shapes) or ``smoke`` (tiny, for CPU checks of the code)."""
    fbgemm: bool = True
    budget_s: float = 420.0
    """Stop starting new table sets after this many seconds (results so far are kept)."""
    table_bytes: int = 2 << 30
    tune: bool = True
    """Tune each shape bucket the tuner does not know yet (on separate input sets)."""
    tune_candidates: int = 0
    """Tile candidates per bucket when tuning (0: all of :func:`tile_candidates`)."""
    tuner_path: Path | None = None
    """Tuned configs to start from (default: those shipped for this device)."""
    tune_levers: bool = False
    """Also search the register cap, pipelining and cache hints per bucket (slower)."""
    workers: int = 12
    device: str = "cuda"
    """``cpu`` runs a smoke test of the whole pipeline under ``TRITON_INTERPRET=1``."""
    commit: str = ""
    seed: int = 0
    ids: str = "int32"
    """Dtype of the cases' ids (int32 where the rows fit, or int64); offsets stay int64."""
    checks: bool = True
    ablation: bool = True
    cases: tuple[str, ...] = ()
    """Only the plan's cases whose name matches one of these shell patterns (all if empty),
    e.g. ``4x1048kx128/fp32/B16384/L80/zipf:*``."""
    retune: tuple[str, ...] = ()
    """Tune again the buckets (keys, shell patterns, e.g. ``*-h?``) that the tuner already
    has, when the selected cases hit them; each such case is also timed with the earlier
    config."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def focused(self) -> bool:
        return bool(self.cases)


def case_bucket(case: Case) -> ShapeBucket:
    """The bucket a case falls in, computed from sizes alone (as the backend does)."""
    vec = ALIGN_BYTES // element_size(case.tables.dtype)
    block_d = max(triton.next_power_of_2(max(case.tables.dims)), vec)
    return ShapeBucket.of(
        case.tables.dtype, block_d, case.lookups, case.tables.num_tables * case.batch
    )


def _job(ts: TableSet, cfg: PooledConfig, **kw: Any) -> PooledJob:
    return PooledJob(ts.dtype, ts.dims, tuple(cfg.to_dict().items()), **kw)


def _check_jobs(dtypes: list[str], configs: list[PooledConfig] | None) -> list[PooledJob]:
    jobs = []
    for dtype, dims, cfg, weighted, reordered, batch, out_dtype in checks.check_jobs(
        dtypes, configs
    ):
        config = tuple(cfg.to_dict().items())
        fp16 = out_dtype == torch.float16
        jobs.append(PooledJob(dtype, tuple(dims), config, weighted, reordered, True, batch, fp16))
    return jobs


def probe_cases(table_bytes: int) -> list[tuple[TableSet, list[Case]]]:
    """Representative shapes for the design probe (every tile candidate is timed on them)."""

    def grid(dtype: str, dim: int, cases: list[tuple[int, int]]) -> tuple[TableSet, list[Case]]:
        ts = uniform_tables(SWEEP_TABLES, dim, dtype, table_bytes)
        return ts, [Case(ts, b, (p,) * SWEEP_TABLES, "uniform", "probe") for b, p in cases]

    micro, _ = model_tables("micro24", "fp32")
    rmc1, _ = model_tables("dlrm-rmc1", "fp32")
    wnd, _ = model_tables("wnd", "fp32")
    return [
        grid("fp32", 128, [(16384, 80), (65536, 1), (2048, 20)]),
        grid("fp32", 32, [(16384, 20), (65536, 1), (256, 1)]),
        grid("fp16", 64, [(2048, 150), (16384, 1)]),
        grid("int8", 128, [(16384, 20)]),
        grid("fp16", 32, [(256, 20), (65536, 80)]),
        (
            micro,
            [
                Case(micro, 2048, (150,) * 12, "uniform", "probe"),
                Case(micro, 2048, (150,) * 12, "zipf:1.05", "probe"),
            ],
        ),
        (rmc1, [Case(rmc1, 2048, (80,) * 8, "zipf:1.05", "probe")]),
        (wnd, [Case(wnd, 16384, (1,) * 27, "uniform", "probe")]),
    ]


ABLATION_CASES: dict[str, tuple[tuple[str, int, bool], ...]] = {
    # fp32 table set -> (ids, batch, reorder hot rows + L2 window?); hot-row ones last, since
    # reordering changes the backend's rows for good.
    "micro24": (("uniform", 2048, False), ("zipf:1.05", 2048, True)),
    "dlrm-rmc1": (("zipf:1.05", 2048, True),),
    "wnd": (("uniform", 16384, False),),
    "smoke": (("uniform", 32, False), ("zipf:1.05", 32, True)),
}


def ablation_picks(ts: TableSet, cases: list[Case]) -> list[tuple[Case, bool]]:
    if ts.dtype != "fp32":
        return []
    picks = []
    for ids, batch, hot in ABLATION_CASES.get(ts.name, ()):
        match = [c for c in cases if c.ids == ids and c.batch == batch]
        if match:
            picks.append((match[0], hot))
    return picks


def _environment(opts: BenchOptions) -> dict[str, Any]:
    on_gpu = opts.device == "cuda"
    props = torch.cuda.get_device_properties(0) if on_gpu else None
    commit = opts.commit or git_commit()
    return {
        "device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit,
        "env": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": triton.__version__,
            "sms": props.multi_processor_count if props else None,
            "l2_bytes": getattr(props, "L2_cache_size", None),
            "memory_bytes": props.total_memory if props else None,
            "mode": opts.mode,
            "budget_s": opts.budget_s,
            "table_bytes": opts.table_bytes,
            "ids": opts.ids,
        },
    }


def _check_dtypes(opts: BenchOptions, sets: list[tuple[TableSet, list[Case]]]) -> list[str]:
    """Row dtypes the on-device checks cover: all, or (focused runs) those of the cases."""
    if not opts.focused:
        return list(checks.CHECK_DTYPES)
    return sorted({ts.dtype for ts, _ in sets})


def _matched_needs(
    sets: list[tuple[TableSet, list[Case]]], ceilings: dict[int, dict[str, Any]]
) -> dict[int, set[tuple[int, bool]]]:
    """(lookups, gather) per row size for the size-matched ceilings: every uniform case with
    fewer lookups than its row size's main ceiling read (gather for pooling 1)."""
    needs: dict[int, set[tuple[int, bool]]] = {}
    for _, cases in sets:
        for case in cases:
            size = case.stored_row_bytes()
            main = ceilings.get(size, {}).get("reads", 0)
            if case.ids != "uniform" or case.lookups >= min(main, report.MATCHED_MAX_READS):
                continue
            needs.setdefault(size, set()).add((case.lookups, set(case.pooling) == {1}))
    return needs


def _ahead_jobs(
    opts: BenchOptions, sets: list[tuple[TableSet, list[Case]]], tuner: KernelTuner
) -> tuple[list[PooledJob | CeilingJob], list[int]]:
    """Every variant whose specialisation is known before the run, and the row sizes."""
    jobs: list[PooledJob | CeilingJob] = []
    row_sizes = sorted({c.stored_row_bytes() for _, cases in sets for c in cases})
    for size in row_sizes:
        for rows, warps in CEILING_VARIANTS:
            for hashed in (False, True):
                jobs.append(CeilingJob(size // 4, rows, warps, hashed))
        for (per_prog, rows, warps), hashed, gather in itertools.product(
            MATCHED_VARIANTS, (False, True), (False, True)
        ):
            jobs.append(CeilingJob(size // 4, rows, warps, hashed, per_prog, gather))
    if opts.checks:
        jobs += _check_jobs(_check_dtypes(opts, sets), None)
    for ts, cases in sets:
        for case in cases:
            bucket = case_bucket(case)
            for skew in (0, 1, 2):
                jobs.append(_job(ts, tuner.config(dataclasses.replace(bucket, skew=skew))))
            if opts.tune or opts.mode == "probe":
                limit = 0 if opts.mode == "probe" else opts.tune_candidates
                # Skewed ids (known only once profiled) add their own tile candidates.
                for skew in (0,) if case.ids == "uniform" else (0, 1, 2):
                    skewed = dataclasses.replace(bucket, skew=skew)
                    jobs += [_job(ts, c) for c in tile_candidates(skewed, limit)]
    return jobs, row_sizes


def run(opts: BenchOptions) -> dict[str, Any]:
    t0 = time.perf_counter()
    opts.out.mkdir(parents=True, exist_ok=True)
    head = _environment(opts)
    tuner = KernelTuner.for_device(head["device"], opts.tuner_path)
    head["env"]["configs"] = tuner.sources  # the shipped and user config files it started from
    fb_error = fbgemm_available() if opts.fbgemm else "disabled"
    if opts.mode == "probe":
        sets = probe_cases(opts.table_bytes)
    elif opts.mode == "smoke":
        sets = smoke_plan()
    else:
        sets = plan(opts.table_bytes, opts.mode == "quick")
    if opts.cases:
        sets = select_cases(sets, opts.cases)
        if not sets:
            raise ValueError(f"no case of the {opts.mode} plan matches {list(opts.cases)}")
    before = KernelTuner(tuner.device, dict(tuner.entries)) if opts.retune else None
    tuned_here: list[str] = []
    tuned_dtype: dict[str, str] = {}

    def retune(key: str) -> bool:
        """Tune ``key`` again: asked for, and not already tuned in this run."""
        return key not in tuned_here and any(fnmatch.fnmatchcase(key, p) for p in opts.retune)

    result: dict[str, Any] = {
        "summary": {},
        **head,
        "fbgemm": fb_error or "ok",
        "timing": "CUDA graph replay of many calls, rotating input sets; median of 5",
        "ceilings": {},
        "checks": [],
        "compile": [],
        "tuning": [],
        "cases": [],
        "ablation": [],
        "probe": [],
        "selected": {"cases": list(opts.cases), "retune": list(opts.retune)},
        "skipped": [],
        "phases": {},
    }

    def phase(name: str) -> None:
        result["phases"][name] = round(time.perf_counter() - t0, 1)
        print(f"[{result['phases'][name]:7.1f}s] {name}", flush=True)

    compiler = Compiler(opts.workers) if opts.device == "cuda" else None

    def compile_jobs(jobs: list[PooledJob | CeilingJob], what: str) -> None:
        if compiler is not None and jobs:
            result["compile"].append({"what": what, **compiler.compile(jobs)})

    jobs, row_sizes = _ahead_jobs(opts, sets, tuner)
    compile_jobs(jobs, "ahead")
    phase(f"compiled {len(jobs)} variants ahead")

    if opts.checks:
        result["checks"] = checks.run_checks(
            opts.device, opts.seed, small=opts.mode == "smoke", dtypes=_check_dtypes(opts, sets)
        )
        bad = [c for c in result["checks"] if not c["ok"]]
        phase(f"checks: {len(result['checks']) - len(bad)} ok, {len(bad)} failed")

    small = opts.mode == "smoke"
    result["ceilings"]["copy"] = copy_bandwidth(1 << 20 if small else 1 << 30, opts.device)
    result["ceilings"]["random_rows"] = random_row_ceilings(
        row_sizes,
        table_bytes=4 << 20 if small else 4 << 30,
        reads_bytes=1 << 16 if small else 2 << 30,
        variants=CEILING_VARIANTS[:1] if small else CEILING_VARIANTS,
        device=opts.device,
    )
    ceilings = result["ceilings"]["random_rows"]
    phase(
        "ceilings: "
        + ", ".join(f"{s}B {c['rows_per_s'] / 1e9:.1f}G/s" for s, c in ceilings.items())
    )
    result["ceilings"]["launch_floor_us"] = launch_floor_us(opts.device)
    matched = size_matched_ceilings(
        _matched_needs(sets, ceilings),
        table_bytes=4 << 20 if small else 4 << 30,
        variants=MATCHED_VARIANTS[:1] if small else MATCHED_VARIANTS,
        device=opts.device,
    )
    result["ceilings"]["size_matched"] = matched
    phase(
        f"launch floor {result['ceilings']['launch_floor_us']:.1f} us, "
        f"{sum(len(v) for v in matched.values())} size-matched ceilings"
    )

    hot_bytes = _hot_bytes() if opts.device == "cuda" else 4096
    for ts, cases in sets:
        if time.perf_counter() - t0 > opts.budget_s:
            result["skipped"] += [c.name for c in cases]
            continue
        bench = TableBench(
            ts,
            tuner,
            opts.fbgemm and fb_error is None,
            opts.seed,
            opts.device,
            max_sets=2 if small else MAX_SETS,
            ids=opts.ids,
        )
        result.setdefault("peer_errors", {})[f"{ts.name}/{ts.dtype}"] = bench.peer_errors
        if opts.mode == "probe":
            result["probe"] += [_probe_case(bench, case) for case in cases]
        elif opts.tune:
            limit = 2 if small else opts.tune_candidates
            # Smoke runs (interpreter) keep two of the skewed buckets' extra tiles too.
            keep = limit + 2 if small else None
            tuned = bench.tune_tiles(
                cases, lambda b, n=limit, k=keep: tile_candidates(b, n)[:k], retune
            )
            tuned_here.extend(tuned)
            tuned_dtype.update(dict.fromkeys(tuned, ts.dtype))
            if opts.tune_levers and tuned:
                compile_jobs([_job(ts, c) for c in bench.lever_configs(tuned)], f"levers {ts.name}")
                bench.tune_levers(
                    tuned,
                    lambda cfgs, ts=ts: compile_jobs([_job(ts, c) for c in cfgs], "combined"),
                )
            result["tuning"] += [_tuning_row(bench, before, k) for k in tuned]
        for case in cases:
            if time.perf_counter() - t0 > opts.budget_s + 60:
                result["skipped"].append(case.name)
                continue
            row = bench.run_case(case, before)
            report.derive(row, ceilings, result["ceilings"]["copy"]["gbps"], matched)
            result["cases"].append(row)
        picks = ablation_picks(ts, cases) if opts.ablation else []
        for case, hot in picks:
            try:
                base = bench.config_for(case)
                variants = ablation.variants(base, case.pooling[0], hot)
                compile_jobs(
                    [_job(ts, c, reordered=r, remap=m) for c, r, m in variants], "ablation"
                )
                result["ablation"].append(
                    ablation.ablate(bench, case, base, hot_bytes if hot else None, l2=hot)
                )
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"[:300]
                result["ablation"].append({"case": case.name, "error": error})
        bench.close()
        phase(f"{ts.name}/{ts.dtype}: {len(cases)} cases")
        _write(result, opts, tuner, tuned_here)
    if opts.checks and opts.focused and tuned_here:
        # The configs this run chose, against the float64 reference (jagged bags, weights,
        # mean pooling, fp16 output), before anyone ships them.
        chosen = {(tuned_dtype[key], tuner.entries[key].config) for key in tuned_here}
        for dtype in sorted({d for d, _ in chosen}):
            configs = sorted({c for d, c in chosen if d == dtype}, key=str)
            compile_jobs(_check_jobs([dtype], configs), "tuned checks")
            got = checks.run_checks(
                opts.device, opts.seed + 1, small, dtypes=[dtype], configs=configs, ceiling=False
            )
            result["checks"] += [{**c, "name": "tuned/" + c["name"]} for c in got]
        bad = [c for c in result["checks"] if not c["ok"]]
        phase(f"checks with the tuned configs: {len(bad)} failed in all")
    if compiler is not None:
        compiler.close()
    phase("done")
    _write(result, opts, tuner, tuned_here)
    if opts.focused:
        print(report.case_table(result["cases"]), flush=True)
    try:
        report.plot(result, opts.out / "kernels-roofline.png")
    except Exception as exc:  # the JSON matters more than the picture
        result["plot_error"] = f"{type(exc).__name__}: {exc}"
        _write(result, opts, tuner, tuned_here)
    return result


def _tuning_row(bench: TableBench, before: KernelTuner | None, key: str) -> dict[str, Any]:
    """A tuned bucket: the cases it was tuned on and each one's time with the chosen config,
    the entry it replaced (if any) and the new entry."""
    replaced = before.entries.get(key) if before is not None else None
    return {
        "bucket": key,
        "tuned_on": bench.tuned_on[key],
        "case_us": bench.tuned_case_us(key),
        "before": replaced.to_dict() if replaced is not None else None,
        **bench.backend.tuner.entries[key].to_dict(),
    }


def _probe_case(bench: TableBench, case: Case) -> dict[str, Any]:
    """Time every tile candidate (no levers) of a case; tunes its bucket as a side effect."""
    bucket = case_bucket(case)
    timed: list[dict[str, Any]] = []
    sets = bench.inputs(case, min(bench.sets_for(case), 64))

    def time_cfg(cfg: PooledConfig) -> float:
        us = time_us(bench.recserve_calls(sets, case, cfg), reps=3, min_ms=1.0)
        timed.append({"config": cfg.to_dict(), "us": us})
        return us

    bench.backend.tuner.entries.pop(bucket.key(), None)
    start = time.perf_counter()
    entry = bench.backend.tuner.tune(bucket, time_cfg, tile_candidates(bucket), levers=False)
    return {
        "case": case.name,
        "bucket": bucket.key(),
        "heuristic": heuristic_config(bucket).to_dict(),
        "best": entry.to_dict(),
        "seconds": time.perf_counter() - start,
        "timed": timed,
    }


def _hot_bytes() -> int | None:
    try:
        from recserve.storage.l2 import l2_limits

        return l2_limits().max_persisting_bytes
    except Exception:
        return 32 << 20


def _write(
    result: dict[str, Any], opts: BenchOptions, tuner: KernelTuner, tuned: list[str]
) -> None:
    """Write the JSON (summary first, of what was measured so far), the tuner's configs and
    those of the buckets ``tuned`` in this run."""
    result["summary"] = {
        **report.summarize(result["cases"], result["ablation"]),
        "launch_floor_us": result["ceilings"].get("launch_floor_us"),
        "device": result["device"],
        "date": result["date"],
        "commit": result["commit"],
        "complete": "done" in result["phases"],
    }
    (opts.out / "kernels.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    tuner.save(opts.out / "kernels-tuned.json")
    KernelTuner(tuner.device, {k: tuner.entries[k] for k in tuned}).save(
        opts.out / "kernels-retuned.json"
    )


def default_out_dir() -> Path:
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return Path("benchmarks") / "results" / device_slug(name)
