"""Per-case derived figures, the ``summary`` object of issue 3, and the roofline-style plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

FBGEMM_PEERS = ("fbgemm_inference", "fbgemm_training")

MATCHED_MAX_READS = 1 << 22
"""Lookup counts up to this get a size-matched ceiling; larger ones fill the GPU, and the main
ceiling (which reads more rows than that for every row size up to 512 bytes) stands for them."""

LARGE_LOOKUPS = 1 << 21
"""Cases with at least this many lookups fill the GPU (2M rows: about 100 microseconds);
smaller ones are partly launch- and latency-bound for every kernel."""


def ceiling_for(ceilings: dict[int, dict[str, Any]], row_bytes: int) -> float:
    """Ceiling rows/s for a row size (the measured size, or the nearest measured above)."""
    sizes = sorted(ceilings)
    for size in sizes:
        if size >= row_bytes:
            return float(ceilings[size]["rows_per_s"])
    return float(ceilings[sizes[-1]]["rows_per_s"]) * sizes[-1] / row_bytes


def matched_key(reads: int, gather: bool) -> str:
    """The key of a size-matched ceiling in ``ceilings.size_matched[row bytes]``."""
    return f"{reads}:gather" if gather else str(reads)


def matched_ceiling_for(
    matched: dict[int, dict[str, dict[str, Any]]] | None,
    ceilings: dict[int, dict[str, Any]],
    row: dict[str, Any],
) -> float | None:
    """The size-matched ceiling of a case (rows/s): the plain kernel reading as many random
    rows of its size (writing each, at pooling 1); for a case larger than any matched
    measurement, the main ceiling (pooling > 1 only). None when not measured."""
    size, lookups = row["stored_row_bytes"], row["lookups"]
    gather = row["pooling"] == 1 or (
        isinstance(row["pooling"], list) and set(row["pooling"]) == {1}
    )
    hit = (matched or {}).get(size, {}).get(matched_key(lookups, gather))
    if hit is not None:
        return float(hit["rows_per_s"])
    main = ceilings.get(size)
    if not gather and main is not None and lookups >= min(main.get("reads", 0), MATCHED_MAX_READS):
        return float(main["rows_per_s"])
    return None


def derive(
    row: dict[str, Any],
    ceilings: dict[int, dict[str, Any]],
    copy_gbps: float,
    matched: dict[int, dict[str, dict[str, Any]]] | None = None,
) -> None:
    """Add fractions of the ceilings and speedups to one case row, in place."""
    ours = row.get("recserve")
    ceiling = ceiling_for(ceilings, row["stored_row_bytes"])
    row["ceiling_rows_per_s"] = ceiling
    same_size = matched_ceiling_for(matched, ceilings, row) if row["ids"] == "uniform" else None
    if same_size is not None:
        row["matched_ceiling_rows_per_s"] = same_size
    if ours is None:
        return
    ours["frac_ceiling"] = ours["rows_per_s"] / ceiling
    # The same ceiling in bytes: the plain kernel moves row bytes only, a lookup also its ids
    # and its bags (at pooling 20 with 64 B rows, 1.16x the bytes per row).
    ours["frac_ceiling_bytes"] = ours["gbps"] * 1e9 / (ceiling * row["stored_row_bytes"])
    if same_size is not None:
        ours["frac_matched_ceiling"] = ours["rows_per_s"] / same_size
    # Of HBM copy bandwidth, for the bytes that must move (rows, ids and the output): at
    # pooling 1 the output is as large as the rows read, which the row-read ceiling ignores.
    ours["frac_copy_bw"] = ours["gbps"] / copy_gbps
    if "torch" in row:
        row["speedup_vs_torch"] = row["torch"]["us"] / ours["us"]
    if "recserve_before" in row:
        row["speedup_vs_before"] = row["recserve_before"]["us"] / ours["us"]
    fb = [row[p]["us"] for p in FBGEMM_PEERS if p in row]
    if fb:
        row["fbgemm_best_us"] = min(fb)
        row["speedup_vs_fbgemm"] = min(fb) / ours["us"]
        for p in FBGEMM_PEERS:
            if p in row:
                row[f"speedup_vs_{p}"] = row[p]["us"] / ours["us"]


def _geomean(xs: list[float]) -> float | None:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _min(xs: list[float]) -> float | None:
    return min(xs) if xs else None


def summarize(cases: list[dict[str, Any]], ablation: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures issue 3's targets name (keys as the issue spells them), plus companions."""
    ok = [c for c in cases if "recserve" in c]

    def frac(rows: list[dict[str, Any]]) -> list[float]:
        return [c["recserve"]["frac_ceiling"] for c in rows]

    uniform = [c for c in ok if c["ids"] == "uniform" and c["dtype"] in ("fp32", "fp16")]
    pool20 = [c for c in uniform if isinstance(c["pooling"], int) and c["pooling"] >= 20]
    pool1 = [c for c in uniform if c["pooling"] == 1]
    large = [c for c in pool20 if c["lookups"] >= LARGE_LOOKUPS]
    large1 = [c for c in pool1 if c["lookups"] >= LARGE_LOOKUPS]
    vs_torch = [c["speedup_vs_torch"] for c in ok if "speedup_vs_torch" in c]
    vs_fb = [c["speedup_vs_fbgemm"] for c in ok if "speedup_vs_fbgemm" in c]
    l2 = [
        r["gain_vs_no_window"]
        for a in ablation
        for r in a.get("rows", [])
        if r.get("lever") in ("l2_window", "l2_window_eager") and "gain_vs_no_window" in r
    ]
    worst = min(pool20, key=lambda c: c["recserve"]["frac_ceiling"], default=None)

    def matched(rows: list[dict[str, Any]]) -> list[float]:
        return [c["recserve"]["frac_matched_ceiling"] for c in rows
                if "frac_matched_ceiling" in c["recserve"]]  # fmt: skip

    worst_matched = min(
        (c for c in pool20 if "frac_matched_ceiling" in c["recserve"]),
        key=lambda c: c["recserve"]["frac_matched_ceiling"],
        default=None,
    )
    return {
        "frac_ceiling_uniform_pool20plus_min": _min(frac(pool20)),
        "frac_ceiling_pool1_min": _min(frac(pool1)),
        "geomean_speedup_vs_torch": _geomean(vs_torch),
        "min_speedup_vs_torch": _min(vs_torch),
        "geomean_speedup_vs_fbgemm": _geomean(vs_fb),
        "min_speedup_vs_fbgemm": _min(vs_fb),
        "l2_window_gain_max": max(l2) if l2 else None,
        "frac_ceiling_uniform_pool20plus_min_large": _min(frac(large)),
        "frac_ceiling_pool1_min_large": _min(frac(large1)),
        "frac_ceiling_uniform_pool20plus_median": _median(frac(pool20)),
        "frac_ceiling_bytes_uniform_pool20plus_min_large": _min(
            [c["recserve"]["frac_ceiling_bytes"] for c in large]
        ),
        "frac_copy_bw_pool1_min": _min([c["recserve"]["frac_copy_bw"] for c in pool1]),
        "frac_copy_bw_pool1_max": max((c["recserve"]["frac_copy_bw"] for c in pool1), default=None),
        "worst_pool20plus_case": worst["name"] if worst else None,
        "frac_matched_ceiling_uniform_pool20plus_min": _min(matched(pool20)),
        "frac_matched_ceiling_pool1_min": _min(matched(pool1)),
        "matched_ceiling_cases": len(matched(pool20)) + len(matched(pool1)),
        "worst_pool20plus_case_matched": worst_matched["name"] if worst_matched else None,
        "cases": len(cases),
        "cases_vs_torch": len(vs_torch),
        "cases_vs_fbgemm": len(vs_fb),
        "cases_slower_than_torch": sum(1 for x in vs_torch if x < 1.0),
        "cases_slower_than_fbgemm": sum(1 for x in vs_fb if x < 1.0),
        "large_lookups_threshold": LARGE_LOOKUPS,
    }


def config_name(cfg: dict[str, Any] | None) -> str:
    """``8x4w2`` plus the levers away from their defaults (``n128``, ``s3``, ``e:first``,
    ``o:bag``, ``p`` for prefetching, ``f`` for early offsets)."""
    if not cfg:
        return "-"
    out = f"{cfg['bags']}x{cfg['rows']}w{cfg['num_warps']}"
    out += f"n{cfg['maxnreg']}" if cfg.get("maxnreg") else ""
    out += f"s{cfg['num_stages']}" if cfg.get("num_stages", 1) != 1 else ""
    out += f"e:{cfg['evict']}" if cfg.get("evict", "none") != "none" else ""
    out += "o:bag" if cfg.get("order") == "bag" else ""
    out += "p" if cfg.get("prefetch") else ""
    out += "f" if cfg.get("early_offsets") else ""
    return out


def case_table(cases: list[dict[str, Any]]) -> str:
    """A short text table of timed cases: microseconds per method, recserve's speedups over
    the best FBGEMM TBE and torch, and over the config the run started from, its fractions of
    the random-row-read ceiling (in rows, and in bytes that must move) and of the size-matched
    one, the largest relative difference from the peers' outputs, and the bucket and config
    used."""

    def us(row: dict[str, Any], name: str) -> str:
        return f"{row[name]['us']:.1f}" if name in row else "-"

    def ratio(row: dict[str, Any], key: str) -> str:
        return f"{row[key]:.2f}" if key in row else "-"

    header = (
        "case",
        "recserve",
        "before",
        "fbgemm_inf",
        "fbgemm_trn",
        "torch",
        "x_fbgemm",
        "x_torch",
        "x_before",
        "of_ceil",
        "of_ceil_bytes",
        "of_size_ceil",
        "max_diff",
        "skew_ratio",
        "bucket",
        "config (before)",
    )
    lines = [header]
    for row in cases:
        diffs = [v for k, v in row.items() if k.endswith("_max_rel_diff")]
        config = config_name(row.get("config"))
        if "config_before" in row:
            config += f" ({config_name(row['config_before'])})"
        lines.append(
            (
                row["name"],
                us(row, "recserve"),
                us(row, "recserve_before"),
                us(row, "fbgemm_inference"),
                us(row, "fbgemm_training"),
                us(row, "torch"),
                ratio(row, "speedup_vs_fbgemm"),
                ratio(row, "speedup_vs_torch"),
                ratio(row, "speedup_vs_before"),
                ratio(row.get("recserve", {}), "frac_ceiling"),
                ratio(row.get("recserve", {}), "frac_ceiling_bytes"),
                ratio(row.get("recserve", {}), "frac_matched_ceiling"),
                f"{max(diffs):.1e}" if diffs else "-",
                f"{row['unique_vs_uniform']:.2f}" if "unique_vs_uniform" in row else "-",
                row.get("bucket", "-"),
                config,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i in (0, len(header) - 2, len(header) - 1) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    )


def _median(xs: list[float]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def plot(result: dict[str, Any], path: Path) -> None:
    """Roofline-style PNG: rows/s against row size with the measured ceilings, and achieved
    bandwidth against lookups per call, for recserve and its peers (uniform ids)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ceilings = {int(k): v for k, v in result["ceilings"]["random_rows"].items()}
    copy_gbps = result["ceilings"]["copy"]["gbps"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    sizes = sorted(ceilings)
    ax1.plot(
        sizes,
        [ceilings[s]["rows_per_s"] / 1e9 for s in sizes],
        "k-o",
        label="random-row-read ceiling",
    )
    ax1.plot(
        sizes,
        [copy_gbps / s for s in sizes],
        "k--",
        label=f"HBM copy {copy_gbps:.0f} GB/s / row bytes",
    )
    styles = {
        "recserve": ("tab:red", "o"),
        "torch": ("tab:blue", "x"),
        "fbgemm_inference": ("tab:green", "^"),
        "fbgemm_training": ("tab:olive", "v"),
    }
    uniform = [c for c in result["cases"] if c["ids"] == "uniform"]
    for name, (color, marker) in styles.items():
        pts = [
            (c["stored_row_bytes"], c[name]["rows_per_s"] / 1e9, c["lookups"])
            for c in uniform
            if name in c
        ]
        if not pts:
            continue
        xs = [p[0] * (1 + 0.04 * (list(styles).index(name) - 1.5)) for p in pts]
        ax1.scatter(xs, [p[1] for p in pts], c=color, marker=marker, s=14, alpha=0.6, label=name)
        ax2.scatter(
            [p[2] for p in pts],
            [c[name]["gbps"] for c in uniform if name in c],
            c=color,
            marker=marker,
            s=14,
            alpha=0.6,
            label=name,
        )
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("stored row bytes")
    ax1.set_ylabel("G rows / s")
    ax1.set_title("Rows per second vs row size (uniform ids)")
    ax1.legend(fontsize=8)
    ax2.axhline(copy_gbps, color="k", ls="--", label="HBM copy")
    ax2.set_xscale("log")
    ax2.set_xlabel("lookups per call")
    ax2.set_ylabel("GB/s of bytes that must move")
    ax2.set_title("Achieved bandwidth vs work per call (uniform ids)")
    ax2.legend(fontsize=8)
    fig.suptitle(f"pooled lookup on {result['device']} ({result['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
