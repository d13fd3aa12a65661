"""The model repository: a folder with one folder per model, loaded at start and on request.

Layout (what :func:`recserve.models.io.save_model` writes, plus an optional serving file)::

    <repository>/
      wnd/
        config.json          # ModelConfig
        model.safetensors    # weights (tables included)
        serving.json         # optional ServingConfig overrides, e.g. {"max_queue_delay_ms": 1}

The folder name is the model name; each model has one version, ``"1"``. Names are checked
(letters, digits, ``_``, ``-``, ``.``; no ``..``) and the folder must resolve inside the
repository, so a request cannot reach files elsewhere.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from recserve.config import ModelConfig
from recserve.engine.config import EngineConfig
from recserve.engine.interface import InferenceEngine
from recserve.runtime import resolve_device
from recserve.server.batching import DynamicBatcher
from recserve.server.errors import InvalidArgument, NotFound, Unavailable
from recserve.server.local_engine import LocalEngine
from recserve.server.metrics import ModelView, ServerMetrics
from recserve.server.protocol import ModelSignature
from recserve.server.settings import ServingConfig

log = logging.getLogger(__name__)

VERSION = "1"
PLATFORM = "recserve_torch"
CONFIG_FILE = "config.json"
_GENERATIONS = itertools.count(1)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")

EngineFactory = Callable[[torch.nn.Module, ServingConfig], InferenceEngine]
"""Builds the engine of a loaded model (a :class:`~recserve.models.RecModel`)."""


def local_engine_factory(model: torch.nn.Module, serving: ServingConfig) -> InferenceEngine:
    return LocalEngine(
        model,  # type: ignore[arg-type]
        workers=serving.workers,
        max_queue=serving.engine_queue,
        intra_op_threads=serving.intra_op_threads,
    )


def rec_engine_config(serving: ServingConfig) -> EngineConfig:
    """How the server configures the DeepRecSys engine: on a GPU (``serving.device``
    ``cuda``/``auto`` with one present) every request goes to the engine's GPU runner process
    (whole-forward CUDA graphs), queued requests coalesced into one batch; on the CPU: CPU
    worker processes, the requests split DeepRecSys-style. ``max_inflight_batches`` sets the
    runner's slots, and ``max_queue_delay_ms`` how long the oldest queued request may wait for
    others to join its GPU batch."""
    from recserve.engine import EngineConfig, SchedConfig

    device = resolve_device(serving.device)
    items = max(serving.max_items, serving.max_batch_items)
    # the batcher hands it every request alone (it coalesces itself), up to the server's bound
    queue = max(serving.engine_queue, serving.max_inflight_batches, serving.max_queue_requests)
    if device.type == "cuda":
        # the engine coalesces here, so the server's batching delay is its coalescing delay
        delay = serving.max_queue_delay_ms / 1000
        return EngineConfig(
            sched=SchedConfig(
                sub_batch_size=None, gpu_threshold=0, gpu_max_batch=items, gpu_max_delay=delay
            ),
            cpu_workers=0,
            device=str(device),
            max_query_items=items,
            queue_capacity=queue,
            gpu_max_inflight=max(2, serving.max_inflight_batches),
            busy_poll_us=serving.busy_poll_us,
            busy_poll_max_outstanding=serving.busy_poll_max_outstanding,
        )
    return EngineConfig(
        device="none",
        max_query_items=items,
        queue_capacity=queue,
        busy_poll_us=serving.busy_poll_us,
        busy_poll_max_outstanding=serving.busy_poll_max_outstanding,
    )


def rec_engine_factory(model: torch.nn.Module, serving: ServingConfig) -> InferenceEngine:
    """The DeepRecSys engine (:class:`~recserve.engine.RecEngine`, configured by
    :func:`rec_engine_config`) in a process of its own
    (:class:`~recserve.server.engine_host.EngineHost`: front-end processes send it requests
    directly, off the server process's interpreter lock). The engine joins queued requests
    itself, so the server's batcher passes each request straight to it
    (``RecEngine.coalesces``). The engine process runs ``serving.intra_op_threads`` torch
    threads, not one per core (see :class:`~recserve.server.engine_host.HostSpec`)."""
    from recserve.server.engine_host import EngineHost

    return EngineHost(
        model.cpu(), rec_engine_config(serving), torch_threads=serving.intra_op_threads
    )


ENGINES: dict[str, EngineFactory] = {"local": local_engine_factory, "rec": rec_engine_factory}
"""Engine factories by name (``recserve serve --engine``)."""


def resolve_engine(engine: str, device: str) -> str:
    """``auto``: the rec engine where the model runs on a GPU (the configuration the server's
    benchmarks of record measure), the local one on the CPU, where the rec engine's worker
    processes only add to a small machine's load."""
    if engine != "auto":
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}: choose auto, {', '.join(ENGINES)}")
        return engine
    return "rec" if resolve_device(device).type == "cuda" else "local"


def default_frontends(engine: str, device: str, cores: int | None = None) -> int:
    """Front-end processes when none are asked for: with the rec engine on a GPU, one per two
    cores up to 8 (8 on 16 cores is the measured configuration of record), else none (the
    server process decodes requests itself, leaving the cores to the model)."""
    cores = cores if cores is not None else (os.cpu_count() or 1)
    if engine == "rec" and resolve_device(device).type == "cuda":
        return max(1, min(8, cores // 2))
    return 0


def check_model_name(name: object) -> str:
    """``name`` if it is a valid model name, else :class:`InvalidArgument`."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise InvalidArgument(
            f"invalid model name {name!r}: use letters, digits, '_', '-' and '.', at most 128, "
            "no path separators or '..'"
        )
    return name


@dataclass
class ServedModel:
    """A loaded model: its config, signature, engine and batcher."""

    name: str
    folder: Path
    config: ModelConfig
    serving: ServingConfig
    signature: ModelSignature
    engine: InferenceEngine
    batcher: DynamicBatcher
    ready: bool = True
    generation: int = field(default_factory=lambda: next(_GENERATIONS))
    """Tells one load of a model from the next (front-end processes cache signatures by it)."""

    def metadata(self) -> dict[str, Any]:
        """KServe v2 model metadata."""
        return {
            "name": self.name,
            "versions": [VERSION],
            "platform": PLATFORM,
            "inputs": [s.metadata() for s in self.signature.inputs],
            "outputs": [s.metadata() for s in self.signature.outputs],
        }

    def model_config(self) -> dict[str, Any]:
        """Triton-style model configuration (what ``GET .../config`` answers)."""

        def tensor(spec: Any) -> dict[str, Any]:
            entry = {
                "name": spec.name,
                "data_type": f"TYPE_{spec.datatype}",
                "dims": list(spec.shape),
            }
            if spec.optional:
                entry["optional"] = True
            return entry

        serving = self.serving
        return {
            "name": self.name,
            "platform": PLATFORM,
            "backend": "recserve",
            "max_batch_size": 0,
            "input": [tensor(s) for s in self.signature.inputs],
            "output": [tensor(s) for s in self.signature.outputs],
            "dynamic_batching": {
                "max_queue_delay_microseconds": int(serving.max_queue_delay_ms * 1000),
            },
            "parameters": {
                "family": {"string_value": self.config.family},
                "num_tasks": {"string_value": str(self.config.num_tasks)},
                "max_items": {"string_value": str(serving.max_items)},
                "max_batch_items": {"string_value": str(serving.max_batch_items)},
                "max_queue_requests": {"string_value": str(serving.max_queue_requests)},
                "device": {"string_value": serving.device},
            },
        }


class ModelRepository:
    """Loaded models of one server; every method runs on the server's event loop."""

    def __init__(
        self,
        root: Path | None,
        defaults: ServingConfig,
        metrics: ServerMetrics,
        executor: concurrent.futures.Executor,
        engine_factory: EngineFactory = local_engine_factory,
    ) -> None:
        self.root = root.resolve() if root is not None else None
        self.defaults = defaults
        self.metrics = metrics
        self.executor = executor
        self.engine_factory = engine_factory
        self.models: dict[str, ServedModel] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def available(self) -> list[str]:
        """Names of the model folders in the repository."""
        if self.root is None or not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if (p / CONFIG_FILE).is_file() and _NAME.fullmatch(p.name)
        )

    def index(self) -> list[dict[str, Any]]:
        """KServe repository index: every model folder and loaded model, with its state."""
        names = sorted(set(self.available()) | set(self.models))
        entries = []
        for name in names:
            served = self.models.get(name)
            state = "UNAVAILABLE" if served is None else "READY" if served.ready else "UNLOADING"
            entry = {"name": name, "version": VERSION, "state": state}
            if served is None:
                entry["reason"] = "not loaded"
            entries.append(entry)
        return entries

    def get(self, name: str, version: str = "") -> ServedModel:
        """The ready model ``name``; :class:`NotFound` or :class:`Unavailable` otherwise."""
        check_model_name(name)
        served = self.models.get(name)
        if served is None:
            hint = ""
            if name in self.available():
                hint = f" (it is in the repository: POST /v2/repository/models/{name}/load)"
            raise NotFound(f"unknown model {name!r}: not loaded{hint}")
        if version not in ("", VERSION):
            raise NotFound(f"model {name!r} has no version {version!r} (versions: ['{VERSION}'])")
        if not served.ready:
            raise Unavailable(f"model {name!r} is unloading")
        return served

    def folder(self, name: str) -> Path:
        check_model_name(name)
        if self.root is None:
            raise NotFound("the server has no model repository")
        folder = (self.root / name).resolve()
        if folder.parent != self.root or not (folder / CONFIG_FILE).is_file():
            raise NotFound(f"no model {name!r} in the repository")
        return folder

    async def load(self, name: str) -> ServedModel:
        """Load (or reload) ``name`` from its folder; the old copy drains after the swap."""
        folder = self.folder(name)
        async with self._lock(name):
            try:
                config, serving, engine = await asyncio.to_thread(self._build, folder)
            except Exception as e:
                raise InvalidArgument(f"failed to load model {name!r}: {e}") from None
            served = self._serve(name, folder, config, serving, engine)
            old = self.models.get(name)
            self.models[name] = served
            self.metrics.add_model(name, _view(served))
            log.info("loaded model %s from %s", name, folder)
            if old is not None:
                old.ready = False
                await old.batcher.close()
            return served

    async def unload(self, name: str) -> None:
        """Stop taking requests for ``name``, answer the accepted ones, release it."""
        check_model_name(name)
        async with self._lock(name):
            served = self.models.get(name)
            if served is None:
                raise NotFound(f"unknown model {name!r}: not loaded")
            served.ready = False
            await served.batcher.close()
            del self.models[name]
            self.metrics.remove_model(name)
            log.info("unloaded model %s", name)

    async def add(
        self, name: str, model: torch.nn.Module, serving: ServingConfig | None = None
    ) -> ServedModel:
        """Serve an in-memory model (no folder): for embedding the server and for tests."""
        check_model_name(name)
        serving = serving or self.defaults
        config = getattr(model, "config", None)
        if not isinstance(config, ModelConfig):
            raise ValueError("model must have a ModelConfig in .config")
        engine = await asyncio.to_thread(self.engine_factory, model, serving)
        served = self._serve(name, Path(), config, serving, engine)
        self.models[name] = served
        self.metrics.add_model(name, _view(served))
        return served

    async def close(self) -> None:
        await asyncio.gather(*(self.unload(name) for name in list(self.models)))

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _build(self, folder: Path) -> tuple[ModelConfig, ServingConfig, InferenceEngine]:
        from recserve.models.io import load_model

        serving = self.defaults.with_file(folder)
        model = load_model(folder, device=resolve_device(serving.device))
        return model.config, serving, self.engine_factory(model, serving)

    def _serve(
        self,
        name: str,
        folder: Path,
        config: ModelConfig,
        serving: ServingConfig,
        engine: InferenceEngine,
    ) -> ServedModel:
        batcher = DynamicBatcher(
            engine,
            max_batch_items=serving.max_batch_items,
            max_queue_delay_s=serving.max_queue_delay_ms / 1000,
            max_inflight_batches=serving.max_inflight_batches,
            max_queue_requests=serving.max_queue_requests,
            executor=self.executor,
            on_batch=self.metrics.batch_observer(name),
        )
        signature = ModelSignature(config, serving.max_items)
        return ServedModel(name, folder, config, serving, signature, engine, batcher)


def _view(served: ServedModel) -> ModelView:
    batcher = served.batcher

    def queue_depth() -> int:
        depth = batcher.queued_requests + batcher.inflight_requests
        if getattr(served.engine, "address", None) is not None:  # front ends reach it directly
            depth += int(served.engine.stats().get("in_system", 0) or 0)
        return depth

    return ModelView(
        queue_depth=queue_depth,
        inflight_batches=lambda: batcher.inflight_batches,
        ready=lambda: served.ready,
        engine_stats=served.engine.stats,
    )
