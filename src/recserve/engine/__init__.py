"""The serving engine: bounded queue, DeepRecSys scheduler, CPU workers, GPU runner, tuner."""

from recserve.engine.config import EngineConfig, SchedConfig
from recserve.engine.engine import RecEngine
from recserve.engine.interface import EngineClosed, InferenceEngine, Overloaded

__all__ = [
    "EngineClosed",
    "EngineConfig",
    "InferenceEngine",
    "Overloaded",
    "RecEngine",
    "SchedConfig",
]
