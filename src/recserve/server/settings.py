"""Server configuration: one :class:`ServerSettings` per process, one :class:`ServingConfig` per
model (the server's defaults, overridden field by field by the model folder's ``serving.json``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recserve.polling import default_busy_poll_us

SERVING_FILE = "serving.json"


@dataclass(frozen=True)
class ServingConfig:
    """How one model is served: limits, dynamic batching, engine size."""

    max_items: int = 4096
    """Most items (B) one request may carry; more is answered 400 / INVALID_ARGUMENT."""
    max_batch_items: int = 1024
    """Dynamic batching joins concurrent requests into one engine call of at most this many
    items; a request at least this large goes alone."""
    max_queue_delay_ms: float = 0.0
    """Longest a request waits for others to join its batch while an engine slot is free. With
    0 a request goes as soon as a slot is free, and requests that arrive while every slot is
    busy are joined (batching adapts to load, never adds latency at low load). With the rec
    engine on a GPU, the engine coalesces the requests itself, and this is its delay."""
    max_inflight_batches: int = 2
    """Engine calls in flight at once (slots); more requests wait in the batcher."""
    max_queue_requests: int = 256
    """Requests waiting or in flight per model; one more is refused (429 /
    RESOURCE_EXHAUSTED) at once rather than queued without bound."""
    workers: int = 1
    """Worker threads of the local engine."""
    intra_op_threads: int = 1
    """Torch threads of each local engine worker (DeepRecSys runs one per worker: scale with
    ``workers``), and of the rec engine's process; OpenMP teams in several threads of one
    process stall each other on a busy machine."""
    engine_queue: int = 64
    """Bounded queue of the local engine (batches)."""
    device: str = "cpu"
    """Where the model runs: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``."""
    busy_poll_us: int = field(default_factory=default_busy_poll_us)
    """Front-end processes and the rec engine poll, without sleeping, for up to this long for
    the answers they wait on (:mod:`recserve.polling`): lower latency, for a core's time.
    0: off. Default: 1000 on a machine of at least 8 cores, else 0."""
    busy_poll_max_outstanding: int = 1
    """Poll only while a process has at most this many answers outstanding (a light load,
    where a core is free); 0: however many."""

    def __post_init__(self) -> None:
        for name in (
            "max_items",
            "max_batch_items",
            "max_inflight_batches",
            "workers",
            "intra_op_threads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"serving config: {name} must be >= 1")
        if self.max_queue_requests < 1 or self.engine_queue < 1:
            raise ValueError("serving config: queue sizes must be >= 1")
        if self.busy_poll_us < 0 or self.busy_poll_max_outstanding < 0:
            raise ValueError(
                "serving config: busy_poll_us and busy_poll_max_outstanding must be >= 0"
            )
        if self.max_queue_delay_ms < 0:
            raise ValueError("serving config: max_queue_delay_ms must be >= 0")

    def override(self, changes: dict[str, Any]) -> ServingConfig:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown serving config fields {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)

    def with_file(self, folder: Path) -> ServingConfig:
        """These defaults overridden by ``folder/serving.json`` where it exists."""
        path = folder / SERVING_FILE
        if not path.is_file():
            return self
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return self.override(data)


@dataclass
class ServerSettings:
    """What one server process listens on, loads and allows."""

    repository: Path | None = None
    """Model repository: one folder per model (``config.json``, ``model.safetensors``, optional
    ``serving.json``)."""
    models: tuple[str, ...] | None = None
    """Models to load at start; None loads every model folder of the repository."""
    host: str = "127.0.0.1"
    """Address both protocols bind to (loopback unless told otherwise)."""
    http_port: int | None = 8000
    """HTTP/REST port (0: any free port, None: no HTTP)."""
    grpc_port: int | None = 8001
    """gRPC port (0: any free port, None: no gRPC)."""
    max_body_bytes: int = 64 << 20
    """Largest request body (HTTP, after decompression) or gRPC message accepted."""
    offload_bytes: int = 1 << 20
    """Bodies at least this large are decoded and validated on a worker thread, so large
    requests never stall the event loop."""
    frontends: int = 0
    """Front-end processes that accept connections on the public ports, decode and validate
    requests, and hand decoded batches to this process (:mod:`recserve.server.frontend`); 0
    answers everything on this process's event loop. Raise it when request decoding, not the
    model, limits throughput (small requests at high rates)."""
    decode_threads: int = 2
    """Threads that decode large bodies and join batches."""
    grace_s: float = 30.0
    """On shutdown, how long in-flight requests get to finish."""
    model_control: bool = True
    """Whether the load/unload endpoints are enabled."""
    serving: ServingConfig = field(default_factory=ServingConfig)
    """Defaults for every model."""

    def __post_init__(self) -> None:
        if self.frontends < 0:
            raise ValueError("server settings: frontends must be >= 0")
