"""The serving engine: bounded queue, DeepRecSys scheduler, CPU workers, GPU runner, tuner."""

from recserve.engine.config import EngineConfig, SchedConfig
from recserve.engine.engine import RecEngine
from recserve.engine.interface import EngineClosed, InferenceEngine, Overloaded
from recserve.engine.query_memory import QueryMemory

__all__ = [
    "EngineClosed",
    "EngineConfig",
    "InferenceEngine",
    "Overloaded",
    "QueryMemory",
    "RecEngine",
    "SchedConfig",
]
