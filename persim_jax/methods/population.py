"""Ablation: the population model. The same factorised network with the agent
factor removed, one simulator for everyone (every agent id set to 0: u is one
learned vector, absorbed by the state and action factors). Planned and scored
exactly as PerSim; its gap to PerSim is what personalisation buys."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from persim_jax.data import Transitions
from persim_jax.dynamics import simulator_dynamics_for_agent
from persim_jax.methods.base import ModelBased, Trains
from persim_jax.persim.simulator import Simulator
from persim_jax.persim.train import TrainConfig, fit


def pooled(transitions: Transitions) -> Transitions:
    """The transitions as one agent's (every id 0): the population's data."""
    return transitions.replace(agent_id=np.zeros_like(np.asarray(transitions.agent_id)),
                               num_agents=1, covariates=None, covariate_names=None,
                               agent_keys=None)


@dataclasses.dataclass(frozen=True)
class Population(ModelBased, Trains):
    """One simulator for every agent, trained on the pooled transitions."""

    config: TrainConfig
    name: ClassVar[str] = "population"

    @classmethod
    def from_settings(cls, settings, *, env, training):
        del settings, env           # the run's training config, as PerSim's
        return cls(training)

    def train(self, transitions, key, *, workdir=None, agent_ids=None) -> Simulator:
        del agent_ids
        return fit(pooled(transitions), self.config, key=key, checkpoint_dir=workdir)

    def save(self, trained: Simulator, path) -> None:
        trained.save(path)

    def load(self, path) -> Simulator:
        return Simulator.load(path)

    def dynamics_for_agent(self, trained: Simulator, agent_ids, *, for_planning=True):
        return simulator_dynamics_for_agent(trained, [0] * len(agent_ids), fold=for_planning)
