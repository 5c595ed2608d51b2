"""Ablation: the per-agent model. The same network trained on each evaluated
agent's own trajectory alone (one ensemble per agent, nothing shared): what
one trajectory teaches without the other agents."""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar, Sequence

import jax
import numpy as np
from flax import struct

from persim_jax.data import Transitions, load_msgpack, save_msgpack
from persim_jax.dynamics import SimulatorDynamicsForAgent
from persim_jax.methods.base import ModelBased, Trains
from persim_jax.methods.population import pooled
from persim_jax.persim.simulator import Simulator
from persim_jax.persim.train import TrainConfig, fit

STACKED_FORMAT = "persim-jax-per-agent-simulators"


def own_trajectory(transitions: Transitions, agent: int) -> Transitions:
    """Agent `agent`'s transitions alone, as agent 0 of a one-agent dataset."""
    rows = np.flatnonzero(np.asarray(transitions.agent_id) == agent)
    if not rows.size:
        raise ValueError(f"agent_ids: agent {agent} has no transitions")
    return pooled(transitions.select(rows))


def stack_simulators(simulators: Sequence[Simulator]) -> Simulator:
    """K simulators of one config as one, every leaf with a leading K axis."""
    simulators = [s.replace(rank_losses=None, agent_keys=None) for s in simulators]
    return jax.tree.map(lambda *leaves: jax.numpy.stack(leaves), *simulators)


def simulator_row(stacked: Simulator, index) -> Simulator:
    """Simulator `index` of K stacked ones."""
    return jax.tree.map(lambda leaf: leaf[index], stacked)


@struct.dataclass
class PerAgentDynamicsForAgent:
    """Row i -> the dynamics of the i-th of K stacked one-agent simulators."""

    simulators: Simulator
    fold: bool = struct.field(pytree_node=False, default=True)

    def __call__(self, agent_index, covariates):
        del covariates
        simulator = simulator_row(self.simulators, agent_index)
        return SimulatorDynamicsForAgent(simulator, None, self.fold)(0, None)


@dataclasses.dataclass(frozen=True)
class PerAgent(ModelBased, Trains):
    """One ensemble per evaluated agent, each on that agent's trajectory."""

    config: TrainConfig
    name: ClassVar[str] = "per_agent"

    @classmethod
    def from_settings(cls, settings, *, env, training):
        del settings, env           # the run's training config, as PerSim's
        return cls(training)

    def train(self, transitions, key, *, workdir=None, agent_ids=None) -> Simulator:
        """One simulator per id of `agent_ids`, stacked on a leading axis."""
        if agent_ids is None or not len(agent_ids):
            raise ValueError("agent_ids: per_agent trains one simulator per evaluated agent; "
                             "give their ids")
        simulators = []
        for index, agent in enumerate(agent_ids):
            directory = None if workdir is None else os.path.join(os.fspath(workdir),
                                                                  f"agent{int(agent)}")
            simulators.append(fit(own_trajectory(transitions, int(agent)), self.config,
                                  key=jax.random.fold_in(key, index), checkpoint_dir=directory,
                                  progress=False))
        return stack_simulators(simulators)

    def save(self, trained: Simulator, path) -> None:
        count = trained.validation_loss.shape[0]
        payload = {"format": STACKED_FORMAT,
                   "simulators": [simulator_row(trained, i).to_bytes() for i in range(count)]}
        save_msgpack(path, payload)

    def load(self, path) -> Simulator:
        payload = load_msgpack(path, STACKED_FORMAT, "a file of per-agent simulators")
        return stack_simulators([Simulator.from_bytes(data, os.fspath(path))
                                 for data in payload["simulators"]])

    def dynamics_for_agent(self, trained: Simulator, agent_ids, *, for_planning=True):
        return PerAgentDynamicsForAgent(trained, for_planning)
