"""``recserve serve``: the KServe v2 HTTP/gRPC server over a model repository."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import torch

from recserve.runtime import resolve_device
from recserve.server.app import InferenceServer, format_address
from recserve.server.repository import (
    ENGINES,
    EngineFactory,
    default_frontends,
    local_engine_factory,
    resolve_engine,
)
from recserve.server.settings import ServerSettings, ServingConfig


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "serve",
        help="serve models over KServe v2 HTTP/gRPC (Triton-compatible)",
        description="Serve the models of a repository folder (one folder per model: "
        "config.json, model.safetensors, optional serving.json) over KServe v2 HTTP/REST and "
        "gRPC, with /metrics for Prometheus. Binds to 127.0.0.1 unless told otherwise. "
        "SIGTERM or Ctrl-C stops it gracefully: in-flight requests finish first.",
    )
    add_server_arguments(p)
    p.set_defaults(func=run)
    return p


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    d, s = ServerSettings(), ServingConfig()
    p.add_argument(
        "--repository",
        "--model-repository",
        type=Path,
        required=True,
        help="model repository folder",
    )
    p.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help="load only this model at start (repeatable; default: every model)",
    )
    p.add_argument("--host", default=d.host, help="address to bind (default %(default)s)")
    p.add_argument(
        "--http-port",
        type=int,
        default=d.http_port,
        help="HTTP port, 0 for any free one, -1 for none (default %(default)s)",
    )
    p.add_argument(
        "--grpc-port",
        type=int,
        default=d.grpc_port,
        help="gRPC port, 0 for any free one, -1 for none (default %(default)s)",
    )
    p.add_argument(
        "--max-body-mb",
        type=float,
        default=d.max_body_bytes / 2**20,
        help="largest request body or gRPC message in MiB (default %(default)s)",
    )
    p.add_argument(
        "--max-items",
        type=int,
        default=s.max_items,
        help="most items per request (default %(default)s)",
    )
    p.add_argument(
        "--max-batch-items",
        type=int,
        default=s.max_batch_items,
        help="dynamic batching: most items per engine call (default %(default)s)",
    )
    p.add_argument(
        "--max-queue-delay-ms",
        type=float,
        default=s.max_queue_delay_ms,
        help="dynamic batching: longest wait for company (default %(default)s)",
    )
    p.add_argument(
        "--max-inflight-batches",
        type=int,
        default=s.max_inflight_batches,
        help="engine calls in flight per model; with --engine rec, the GPU runner's slots "
        "(default %(default)s)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=s.max_queue_requests,
        help="requests waiting or running per model before 429 (default %(default)s)",
    )
    p.add_argument(
        "--intra-op-threads",
        type=int,
        default=s.intra_op_threads,
        help="torch threads per local engine worker, and of the rec engine's process "
        "(default %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=s.workers,
        help="local engine worker threads per model (default %(default)s)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:N or auto (default: the GPU where there is one)",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="intra-op threads of this process (torch.set_num_threads); 0 keeps torch's default",
    )
    p.add_argument(
        "--engine",
        choices=["auto", *sorted(ENGINES)],
        default="auto",
        help="local: worker threads calling the model; rec: the DeepRecSys engine in a process "
        "of its own, which front ends send requests to directly; it joins them itself (on a "
        "GPU in its runner process; on the CPU, split over worker processes); auto (default): "
        "rec on a GPU, local on the CPU",
    )
    p.add_argument(
        "--frontends",
        type=int,
        default=None,
        help="front-end processes that accept and decode requests and hand decoded batches to "
        "the engine (0: all on this process; raise it when request decoding limits the rate; "
        "default: with the rec engine on a GPU one per two cores up to 8, else 0)",
    )
    p.add_argument(
        "--grace-s",
        type=float,
        default=d.grace_s,
        help="seconds in-flight requests get on shutdown (default %(default)s)",
    )
    p.add_argument(
        "--busy-poll-us",
        type=int,
        default=s.busy_poll_us,
        help="front ends and the rec engine poll for the answers they wait on, without "
        "sleeping, for up to this long: lower latency, for a core's time (default "
        "%(default)s: on with 8 or more cores; 0: off)",
    )
    p.add_argument(
        "--busy-poll-max-outstanding",
        type=int,
        default=s.busy_poll_max_outstanding,
        help="poll only while a process has at most this many answers outstanding, a light "
        "load where a core is free (default %(default)s; 0: however many)",
    )
    p.add_argument(
        "--no-model-control", action="store_true", help="disable the load/unload endpoints"
    )
    p.add_argument("--log-level", default="INFO", help="logging level (default %(default)s)")


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    serving = ServingConfig(
        max_items=args.max_items,
        max_batch_items=args.max_batch_items,
        max_queue_delay_ms=args.max_queue_delay_ms,
        max_inflight_batches=args.max_inflight_batches,
        max_queue_requests=args.max_queue,
        workers=args.workers,
        intra_op_threads=args.intra_op_threads,
        device=str(resolve_device(args.device)),
        busy_poll_us=args.busy_poll_us,
        busy_poll_max_outstanding=args.busy_poll_max_outstanding,
    )
    if not args.repository.is_dir():
        raise FileNotFoundError(f"model repository {args.repository} is not a folder")
    engine = resolve_engine(args.engine, args.device)
    frontends = default_frontends(engine, args.device) if args.frontends is None else args.frontends
    return ServerSettings(
        repository=args.repository,
        models=tuple(args.models) if args.models else None,
        host=args.host,
        http_port=None if args.http_port < 0 else args.http_port,
        grpc_port=None if args.grpc_port < 0 else args.grpc_port,
        max_body_bytes=int(args.max_body_mb * 2**20),
        grace_s=args.grace_s,
        frontends=frontends,
        model_control=not args.no_model_control,
        serving=serving,
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    # The event loop shares the GIL with engine threads that run torch ops (most of which keep
    # the GIL); a short switch interval bounds how long a request waits for its turn.
    sys.setswitchinterval(float(os.environ.get("RECSERVE_SWITCH_INTERVAL", "0.0005")))
    engine = args.engine = resolve_engine(args.engine, args.device)  # once: auto looks at CUDA
    settings = settings_from_args(args)
    logging.getLogger("recserve.serve").info(
        "engine %s on %s, %d front-end processes",
        engine,
        settings.serving.device,
        settings.frontends,
    )
    asyncio.run(serve(settings, ENGINES[engine]))
    return 0


async def serve(
    settings: ServerSettings, engine_factory: EngineFactory = local_engine_factory
) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    server = InferenceServer(settings, engine_factory)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        print(
            f"recserve: serving {', '.join(server.core.repository.models) or 'no models'}; "
            f"HTTP on {format_address(settings.host, server.http_port)}, "
            f"gRPC on {format_address(settings.host, server.grpc_port)}",
            flush=True,
        )
        await stop.wait()
        print("recserve: stopping (finishing in-flight requests)", flush=True)
    finally:
        await server.stop()
