"""The engine's knobs: the schedule DeepRecSched tunes, and the fixed resources around it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class SchedConfig:
    """How queries are split and placed: the configuration DeepRecSched hill-climbs."""

    sub_batch_size: int | None = 64
    """b: items per CPU sub-batch (request-level parallelism); ``None`` runs each CPU query whole
    on one worker."""
    gpu_threshold: int | None = None
    """T: queries with at least T items go whole to the GPU runner; ``None`` keeps every query on
    the CPU workers, 0 sends every query to the GPU."""
    gpu_max_batch: int = 2048
    """Items cap when queued GPU queries are coalesced into one batch (1: no coalescing; a query
    larger than the cap still runs, alone)."""
    gpu_max_delay: float = 0.0
    """Seconds the oldest queued GPU query may wait for others to coalesce with."""

    def __post_init__(self) -> None:
        if self.sub_batch_size is not None and self.sub_batch_size < 1:
            raise ValueError(f"sub_batch_size must be >= 1 or None, got {self.sub_batch_size}")
        if self.gpu_threshold is not None and self.gpu_threshold < 0:
            raise ValueError(f"gpu_threshold must be >= 0 or None, got {self.gpu_threshold}")
        if self.gpu_max_batch < 1:
            raise ValueError(f"gpu_max_batch must be >= 1, got {self.gpu_max_batch}")
        if self.gpu_max_delay < 0:
            raise ValueError(f"gpu_max_delay must be >= 0, got {self.gpu_max_delay}")

    @property
    def uses_gpu(self) -> bool:
        return self.gpu_threshold is not None

    def with_(self, **changes: object) -> SchedConfig:
        return replace(self, **changes)  # type: ignore[arg-type]

    def label(self) -> str:
        b = "whole" if self.sub_batch_size is None else str(self.sub_batch_size)
        if self.gpu_threshold is None:
            return f"b={b}"
        return (
            f"b={b} T={self.gpu_threshold} cap={self.gpu_max_batch} "
            f"delay={self.gpu_max_delay * 1e3:g}ms"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "sub_batch_size": self.sub_batch_size,
            "gpu_threshold": self.gpu_threshold,
            "gpu_max_batch": self.gpu_max_batch,
            "gpu_max_delay_ms": self.gpu_max_delay * 1e3,
        }


def default_cpu_workers() -> int:
    """One worker per core, less one for the engine loop and the load generator."""
    return max(1, (os.cpu_count() or 2) - 1)


@dataclass(frozen=True)
class EngineConfig:
    """Resources of one engine: workers, queue bound, GPU runner."""

    sched: SchedConfig = field(default_factory=SchedConfig)
    cpu_workers: int = field(default_factory=default_cpu_workers)
    """CPU worker processes (one thread each); 0 for a GPU-only engine."""
    device: str = "auto"
    """Where the batch-level runner executes: ``cuda``, ``cpu`` (a stand-in for tests and
    machines without a GPU), ``none`` (no runner) or ``auto`` (``cuda`` when there is one,
    else ``none``)."""
    queue_capacity: int = 1024
    """At most this many accepted, unanswered requests; more are refused with ``Overloaded``."""
    max_query_items: int = 1024
    """Largest request accepted (items)."""
    max_ids_per_item: int | None = None
    """Staging room for ids per item (all features); default: twice the model's lookups plus
    its sequence lengths."""
    gpu_max_inflight: int = 3
    """GPU batches in flight at once (staging slots of the runner): more than one lets a batch's
    copies and host work overlap another's compute; a third covers the reply's round trip."""
    stage_threads: int = 4
    """Threads that copy queued queries into the GPU runner's staging slot (a join of several
    dlrm queries is tens of megabytes: one core copies about 5 GB/s); 1: the thread that
    dispatches copies alone."""
    share_inputs: bool = True
    """Let the GPU runner process read queries from memory shared with it
    (:meth:`~recserve.engine.engine.RecEngine.share_memory`) instead of this process copying
    them into its slot; False copies every batch here (for comparison)."""
    join_on_device: bool = True
    """When a GPU batch's queries all lie in shared memory, the runner joins them on the
    device (one launch reads them over PCIe into the graph's inputs,
    :mod:`recserve.kernels.join`) instead of copying them into its slot with host threads;
    False joins on the host (for comparison)."""
    gpu_kernels: str = "triton"
    """The GPU runner's model: ``triton`` (tables in the table-batched Triton backend, the
    whole forward replayed as a CUDA graph per batch-size bucket) or ``torch`` (the model as
    given, launched op by op)."""
    gpu_runner: str = "process"
    """Where the batch-level runner's host work runs: ``process`` (a runner process of its own,
    fed through shared slots, so its PyTorch calls never wait on this process's interpreter
    lock) or ``thread`` (threads of the engine's process)."""
    cpu_queue_depth: int = 2
    """Sub-batches a CPU worker holds at once (one running, the rest queued in its pipe): 2
    lets a worker start its next sub-batch without a round trip through the engine loop."""
    worker_threads: int = 1
    """Intra-op threads per CPU worker (DeepRecSys: one)."""
    shared_dir: str | None = None
    """Folder for the shared weights and staging files; default ``/dev/shm`` when it has room,
    else the temp folder."""
    busy_poll_us: int = 0
    """While queries are in the engine, its loop polls for their answers without sleeping for
    up to this long before it waits in the kernel (:mod:`recserve.polling`): lower latency,
    for a core's time. 0: off. Off by default here: the loop shares its process's interpreter
    lock with the callers, and in-process no gain was measured; the server turns it on for
    its engine process (``ServingConfig.busy_poll_us``)."""
    busy_poll_max_outstanding: int = 1
    """Poll only while at most this many queries are in the engine (a light load, where a
    core is free); 0: however many."""
    gc_freeze: bool = True
    """Once started, freeze the cyclic garbage collector's view of every object alive
    (:func:`recserve.gcpause.freeze`) in the engine's processes (GPU runner, CPU workers) and
    in the process that creates the engine, so a full collection while serving scans only
    objects made since instead of every library's and the model's (tens of ms)."""

    def __post_init__(self) -> None:
        if self.cpu_workers < 0:
            raise ValueError(f"cpu_workers must be >= 0, got {self.cpu_workers}")
        if self.cpu_queue_depth < 1:
            raise ValueError(f"cpu_queue_depth must be >= 1, got {self.cpu_queue_depth}")
        if self.queue_capacity < 1:
            raise ValueError(f"queue_capacity must be >= 1, got {self.queue_capacity}")
        if self.device not in ("auto", "cuda", "cpu", "none") and not self.device.startswith(
            "cuda:"
        ):
            raise ValueError(f"device must be auto, cuda[:N], cpu or none, got {self.device!r}")
        if self.gpu_runner not in ("process", "thread"):
            raise ValueError(f"gpu_runner must be process or thread, got {self.gpu_runner!r}")
        if self.gpu_max_inflight < 1:
            raise ValueError(f"gpu_max_inflight must be >= 1, got {self.gpu_max_inflight}")
        if self.stage_threads < 1:
            raise ValueError(f"stage_threads must be >= 1, got {self.stage_threads}")
        if self.busy_poll_us < 0:
            raise ValueError(f"busy_poll_us must be >= 0, got {self.busy_poll_us}")
        if self.busy_poll_max_outstanding < 0:
            raise ValueError(
                f"busy_poll_max_outstanding must be >= 0, got {self.busy_poll_max_outstanding}"
            )
        if self.gpu_kernels not in ("triton", "torch"):
            raise ValueError(f"gpu_kernels must be triton or torch, got {self.gpu_kernels!r}")
