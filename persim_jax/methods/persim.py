"""PerSim, the paper's method: an ensemble of factorised personalised
simulators (`persim_jax.persim.train.fit`), planned on with every member."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from persim_jax.dynamics import simulator_dynamics_for_agent
from persim_jax.methods.base import ModelBased, Trains, stage_key
from persim_jax.persim.simulator import Simulator
from persim_jax.persim.train import TrainConfig, fit


@dataclasses.dataclass(frozen=True)
class PerSim(ModelBased, Trains):
    """The paper's method (section 5): one simulator for every agent."""

    config: TrainConfig
    name: ClassVar[str] = "persim"

    @classmethod
    def from_settings(cls, settings, *, env, training):
        del settings, env           # its settings are the run's training config
        return cls(training)

    def key(self, stage: str, seed: int, trial: int = 0):
        # The keys PerSim had before the methods protocol, so that its
        # numbers are unchanged: PRNGKey(seed + offset + trial).
        return stage_key(stage, seed, trial)

    def train(self, transitions, key, *, workdir=None, agent_ids=None) -> Simulator:
        del agent_ids   # one simulator for every agent
        return fit(transitions, self.config, key=key, checkpoint_dir=workdir)

    def save(self, trained: Simulator, path) -> None:
        trained.save(path)

    def load(self, path) -> Simulator:
        return Simulator.load(path)

    def dynamics_for_agent(self, trained: Simulator, agent_ids, *, for_planning=True):
        return simulator_dynamics_for_agent(trained, list(agent_ids), fold=for_planning)
