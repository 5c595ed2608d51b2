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
from persim_jax.simulator_env import SimulatorEnv, SimulatorParams, SimulatorState
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
