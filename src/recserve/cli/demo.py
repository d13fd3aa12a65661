"""``recserve demo``: a real model trained, served and queried, then all eight models timed.

1. Fit a small DLRM on the Criteo sample (when the data is found), against a logistic
   regression and a constant predictor, and save it to a model repository.
2. Serve that repository over KServe v2 (HTTP and gRPC on loopback), send the test split
   through the server, and check the served scores against the in-process model.
3. Time the eight DeepRecInfra models on synthetic queries: the ``small`` preset on the CPU,
   the ``paper`` shapes on a GPU (through the Triton embedding kernels and the GPU pipeline).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from recserve.loadgen.synthetic import QueryFactory
from recserve.models.registry import MODEL_NAMES, PRESETS, build_model
from recserve.runtime import resolve_device, time_queries
from recserve.types import validate_batch

CRITEO_SAMPLE = Path("shared") / "data" / "criteo_dac_head8k"
DEMO_MODEL = "criteo-dlrm"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train, serve and query a real model; time all eight models")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default=None,
        help="synthetic models: default paper on a GPU, small on the CPU",
    )
    p.add_argument("--batch", type=int, default=None, help="default: 1024 on a GPU, 128 on the CPU")
    p.add_argument("--iters", type=int, default=None, help="timed queries per model")
    p.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    p.add_argument(
        "--data",
        default=None,
        help="folder with Criteo train.tsv/dev.tsv/test.tsv (default: the shared sample)",
    )
    p.add_argument("--repository", default="models", help="where the trained model is saved")
    p.add_argument("--no-real", action="store_true", help="skip training and serving")
    p.set_defaults(func=run)


def find_criteo_sample(explicit: str | None) -> Path | None:
    """The Criteo sample folder: ``explicit``, else ``../shared/data/...`` next to the checkout
    or the working directory."""
    if explicit:
        path = Path(explicit)
        if not (path / "train.tsv").is_file():
            raise ValueError(f"{path}: no train.tsv (expected Criteo train/dev/test .tsv files)")
        return path
    roots = (Path(__file__).resolve().parents[4], Path.cwd().resolve().parent, Path.cwd())
    return next(
        (r / CRITEO_SAMPLE for r in roots if (r / CRITEO_SAMPLE / "train.tsv").is_file()), None
    )


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    console = Console()
    start = time.perf_counter()
    if not args.no_real:
        data = find_criteo_sample(args.data)
        if data is None:
            console.print("[yellow]Criteo sample not found (--data): skipping train and serve[/]")
        else:
            folder = _train(data, Path(args.repository), console)
            _serve(folder, data, device, console)
    _synthetic(args, device, console)
    console.print(f"[bold]demo done in {time.perf_counter() - start:.1f} s[/]")
    return 0


def _train(data: Path, repository: Path, console: Console) -> Path:
    from recserve.train import TrainOptions, dataset_config, split_readers, train_dlrm

    config = dataset_config("criteo")
    folder = repository / DEMO_MODEL
    console.print(f"[bold]1. Training[/] a DLRM on the Criteo sample in {data}")
    with console.status("fitting the DLRM and a logistic regression…"):
        _, report = train_dlrm(
            config, split_readers("criteo", config, data), TrainOptions(), out=folder
        )
    table = Table(title=f"Criteo sample, test split (fit in {report.seconds:.1f} s)")
    for col in ("model", "logloss", "AUC"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, m in (
        ("recserve DLRM", report.model),
        ("logistic regression", report.logistic),
        ("constant (base rate)", report.constant),
    ):
        table.add_row(name, f"{m.logloss:.4f}", f"{m.auc:.4f}")
    console.print(table)
    console.print(f"saved to {folder}")
    return folder


def _serve(folder: Path, data: Path, device: torch.device, console: Console) -> None:
    from recserve.data import CriteoReader
    from recserve.models import load_model
    from recserve.server import ServerSettings, ServerThread
    from recserve.server.client import GRPCClient, HTTPClient
    from recserve.server.settings import ServingConfig
    from recserve.train import log_loss, roc_auc

    console.print(f"[bold]2. Serving[/] {folder} over KServe v2 on loopback ({device})")
    model = load_model(folder)
    settings = ServerSettings(
        repository=folder.parent,
        models=(folder.name,),
        http_port=0,
        grpc_port=0,
        serving=ServingConfig(device=str(device)),
    )
    reader = CriteoReader(data / "test.tsv", model.config, batch_size=64)
    latencies: dict[str, list[float]] = {"HTTP": [], "gRPC": []}
    served, local, labels = [], [], []
    with ServerThread(settings) as server:
        http, grpc = HTTPClient(server.http_url), GRPCClient(server.grpc_url)
        try:
            for i, item in enumerate(reader):
                validate_batch(item.batch, model.config)
                proto, client = ("HTTP", http) if i % 2 == 0 else ("gRPC", grpc)
                t0 = time.perf_counter()
                scores = client.infer(folder.name, model.config, item.batch)
                latencies[proto].append((time.perf_counter() - t0) * 1e3)
                served.append(torch.from_numpy(np.array(scores, dtype=np.float32)))
                with torch.inference_mode():
                    local.append(model(item.batch))
                labels.append(item.labels)
        finally:
            http.close()
            grpc.close()
    s, m, y = torch.cat(served), torch.cat(local), torch.cat(labels)
    diff = float((s - m).abs().max())
    table = Table(title="Test split through the server")
    for col in ("protocol", "requests", "p50 ms", "max ms"):
        table.add_column(col, justify="right")
    for proto, lat in latencies.items():
        table.add_row(proto, str(len(lat)), f"{np.percentile(lat, 50):.2f}", f"{max(lat):.2f}")
    console.print(table)
    console.print(
        f"{len(y)} items served: AUC {roc_auc(y, s[:, 0]):.4f}, logloss {log_loss(y, s[:, 0]):.4f}; "
        f"largest difference from the in-process model {diff:.1e}"
    )


def _synthetic(args: argparse.Namespace, device: torch.device, console: Console) -> None:
    gpu = device.type == "cuda"
    preset = args.preset or ("paper" if gpu else "small")
    batch = args.batch or (1024 if gpu else 128)
    iters = args.iters or (50 if gpu else 10)
    where = torch.cuda.get_device_name(device) if gpu else "CPU"
    path = "Triton kernels + GPU pipeline" if gpu else "pure torch"
    console.print(
        f"[bold]3. The eight models[/]: {preset} preset, batch {batch}, on {where} ({path})"
    )
    table = Table(title="Synthetic queries (zipf 1.05 ids), one query at a time")
    for col in ("model", "tables", "embeddings", "p50 ms", "p95 ms", "items/s", "mean score"):
        table.add_column(col, justify="left" if col == "model" else "right")
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("models", total=len(args.models) * iters)
        for name in args.models:
            progress.update(task, description=f"{name}: building")
            model = build_model(name, preset, device=device, seed=0)
            runner = model
            if gpu:
                from recserve.pipeline import GPUPipeline, triton_model

                model = triton_model(model)
                runner = GPUPipeline(model)
            queries = QueryFactory(model.config, "zipf:1.05", seed=0)
            batches = [queries.make(batch) for _ in range(min(iters, 4))]
            for b in batches:
                validate_batch(b, model.config)
            progress.update(task, description=f"{name}: running")
            stats = time_queries(
                runner,
                [batches[i % len(batches)] for i in range(iters)],
                device,
                warmup=2,
                on_step=lambda: progress.advance(task),
                copy_inputs=not gpu,
            )
            with torch.inference_mode():
                score = float(runner(batches[0]).mean())
            table.add_row(
                name,
                str(len(model.config.tables)),
                f"{model.config.embedding_bytes / 1e6:,.1f} MB",
                f"{stats.p50:.2f}",
                f"{stats.p95:.2f}",
                f"{stats.items_per_s:,.0f}",
                f"{score:.4f}",
            )
            del model, runner
            if gpu:
                torch.cuda.empty_cache()
    console.print(table)
