"""PerSim's own code (paper, section 5 and Algorithm 1).

  * `model`: the factorised network (`ModelConfig`, `PerSimNet`), its
    standardisation (`NormStats`) and the folded forward pass for planning;
  * `simulator`: `Simulator`, an ensemble of M networks, and its file format;
  * `train`: `TrainConfig`, `fit`, `validation_split`, `EpochMetrics`;
  * `newcomers`: new agents added to a trained simulator in closed form.

Imports go one way: train -> simulator -> newcomers -> model.
"""

from persim_jax.persim.model import ModelConfig, NormStats, PerSimNet
from persim_jax.persim.simulator import Simulator
from persim_jax.persim.train import EpochMetrics, TrainConfig, fit, validation_split

__all__ = ["EpochMetrics", "ModelConfig", "NormStats", "PerSimNet", "Simulator", "TrainConfig",
           "fit", "validation_split"]
