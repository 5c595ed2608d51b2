"""persim-jax: personalised simulators for offline RL with heterogeneous agents (PerSim, in JAX)."""

__version__ = "0.1.0"

from persim_jax.data import (
    Transitions,
    from_long_format,
    from_minari,
    from_rollouts,
    load_csv,
    load_npz,
    load_parquet,
    make_transitions,
    save_csv,
    save_npz,
    to_minari,
    validate_transitions,
)
from persim_jax.persim.model import ModelConfig, NormStats
from persim_jax.persim.simulator import Simulator
from persim_jax.runtime import available_cores, use_cpu_cores
from persim_jax.persim.train import EpochMetrics, TrainConfig, fit, validation_split

__all__ = [
    "EpochMetrics",
    "ModelConfig",
    "NormStats",
    "Simulator",
    "SimulatorEnv",
    "SimulatorParams",
    "SimulatorState",
    "TrainConfig",
    "Transitions",
    "available_cores",
    "fit",
    "from_long_format",
    "from_minari",
    "from_rollouts",
    "load_csv",
    "load_npz",
    "load_parquet",
    "make_transitions",
    "save_csv",
    "save_npz",
    "to_minari",
    "validate_transitions",
    "use_cpu_cores",
    "validation_split",
]


# Imported on first use: `simulator_env` imports gymnax, which starts JAX's
# backends, and `persim_jax.runtime.use_cpu_cores()` must run before that.
_LAZY = {"SimulatorEnv": "simulator_env", "SimulatorParams": "simulator_env",
         "SimulatorState": "simulator_env", "simulator_env": None, "decisions": None}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"persim_jax.{_LAZY[name] or name}")
        return module if _LAZY[name] is None else getattr(module, name)
    raise AttributeError(f"module 'persim_jax' has no attribute {name!r}")
