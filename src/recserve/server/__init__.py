"""KServe v2 (Triton-compatible) HTTP/REST and gRPC server for recserve models.

Start one with ``recserve serve --repository DIR`` or, from Python, :class:`InferenceServer`
(asyncio) / :class:`ServerThread` (background thread). The request layout (named tensors per
feature) is documented in :mod:`recserve.server.protocol`; routes in
:mod:`recserve.server.http_service`; metrics in :mod:`recserve.server.metrics`; the repository
layout in :mod:`recserve.server.repository`.
"""

from recserve.server.app import InferenceServer, ServerThread
from recserve.server.batching import DynamicBatcher, concat_batches
from recserve.server.errors import (
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    QueueFull,
    ServerError,
    Unavailable,
)
from recserve.server.local_engine import LocalEngine
from recserve.server.protocol import ModelSignature
from recserve.server.repository import EngineFactory, ModelRepository, local_engine_factory
from recserve.server.settings import ServerSettings, ServingConfig

__all__ = [
    "DynamicBatcher",
    "EngineFactory",
    "InferenceServer",
    "InvalidArgument",
    "LocalEngine",
    "ModelRepository",
    "ModelSignature",
    "NotFound",
    "PayloadTooLarge",
    "QueueFull",
    "ServerError",
    "ServerSettings",
    "ServerThread",
    "ServingConfig",
    "Unavailable",
    "concat_batches",
    "local_engine_factory",
]
