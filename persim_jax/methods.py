"""The methods the experiment harness compares, behind one small protocol.

Every row of the paper's tables is a method: it learns from the offline
`Transitions` (or not at all) and then hands the evaluation protocols what
they consume for the agents under test:

  * a model-based method hands a `dynamics_for_agent(row, covariates (P,)) ->
    dynamics(obs, action) -> (M, B, D)` (the contract of `planning`): the
    prediction protocol (`evaluation.prediction_error`) scores its open-loop
    predictions and the MPC planner plans on it (`evaluation.run_episodes`);
  * a model-free method hands a per-agent policy instead (reward only).

    method = methods.PerSim(TrainConfig(rank=5, epochs=300))
    trained = method.train(transitions, method.key("train", seed=0), workdir="runs/ckpt")
    dynamics_for_agent = method.dynamics_for_agent(trained, agent_ids=[0, 1, 2, 3, 4])

The harness (`experiments/run.py`) loops over methods and trials, caches what
each trained (`save` / `load`), and gives every method its own keys
(`Method.key`), so that a method's numbers never depend on which other
methods ran beside it. A new method is one subclass here (or in a module of
its own) plus its name in the harness's registry of methods.
"""

from __future__ import annotations

import abc
import dataclasses
import os
import zlib
from typing import Any, ClassVar, Sequence

import jax
import numpy as np
from flax import struct

from persim_jax import evaluation
from persim_jax.data import Transitions, load_msgpack, save_msgpack
from persim_jax.model import Simulator
from persim_jax.train import TrainConfig, fit

# Keys of stage s, trial t, seed k: PRNGKey(k + STAGE_OFFSETS[s] + t), folded
# with the method's name (see `Method.key`).
STAGE_OFFSETS = {"train": 0, "prediction": 1000, "reward": 2000, "plots": 4000}


class Method(abc.ABC):
    """One compared method of the harness.

    Class attributes:
      name: its key in `results.json["methods"]` and `--methods`.
      kind: "model" (hands dynamics: prediction error and MPC reward) or
        "policy" (hands a policy: reward only).
      trains: whether it learns from the transitions (True env + MPC does not).
      predicts: whether the prediction protocol scores it (not the true env,
        whose predictions are exact by construction).
    """

    name: ClassVar[str]
    kind: ClassVar[str] = "model"
    trains: ClassVar[bool] = True
    predicts: ClassVar[bool] = True

    def description(self) -> dict:
        """What the method's numbers depend on besides data, seed and trial
        (JSON-able): part of the harness's cache keys."""
        return {}

    def training_description(self) -> dict:
        """What its training depends on besides data, seed and trial: the
        training stage's cache key. `description()` unless some of it matters
        only after training (CaDM's planning particles), so that changing
        that retrains nothing."""
        return self.description()

    def key(self, stage: str, seed: int, trial: int = 0) -> jax.Array:
        """The PRNG key of `stage` ("train", "prediction", "reward", "plots")
        for `trial`: distinct per method, independent of the others run."""
        base = jax.random.PRNGKey(seed + STAGE_OFFSETS[stage] + trial)
        return jax.random.fold_in(base, zlib.crc32(self.name.encode()))

    def train(self, transitions: Transitions, key: jax.Array, *,
              workdir: str | os.PathLike | None = None,
              agent_ids: Sequence[int] | None = None) -> Any:
        """Learns from `transitions`; returns what `save` writes and the
        protocols' factories take. `workdir` holds resumable checkpoints;
        `agent_ids` are the agents evaluated later (a per-agent method trains
        one model for each of them; the others ignore it)."""
        raise TypeError(f"{self.name} does not train")

    def save(self, trained: Any, path: str | os.PathLike) -> None:
        raise TypeError(f"{self.name} does not train")

    def load(self, path: str | os.PathLike) -> Any:
        raise TypeError(f"{self.name} does not train")

    def dynamics_for_agent(self, trained: Any, agent_ids: Sequence[int], *,
                           for_planning: bool = True) -> evaluation.DynamicsForAgent:
        """Row i of the evaluated covariates -> agent `agent_ids[i]`'s
        dynamics (model-based methods). `for_planning=False` asks for the
        forward pass the prediction protocol scores."""
        raise TypeError(f"{self.name} is not model-based")

    def planner_config(self, config):
        """The planner config this method plans with, given the run's
        (`planning.RandomShootingConfig` / `CEMConfig`): the same by default;
        a method with its own planning objective (CaDM) changes fields."""
        return config

    def policy_for_agent(self, trained: Any, agent_ids: Sequence[int]
                         ) -> evaluation.PolicyForAgent:
        """Row i of the evaluated covariates -> agent `agent_ids[i]`'s policy
        `policy(key, obs) -> action` (model-free methods)."""
        raise TypeError(f"{self.name} is not model-free")


@dataclasses.dataclass(frozen=True)
class PerSim(Method):
    """The paper's method: an ensemble of factorised personalised simulators
    (`train.fit`), planned on with every member (`planning.simulator_dynamics`)."""

    config: TrainConfig
    name: ClassVar[str] = "persim"

    def description(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self.config).items()}

    def key(self, stage: str, seed: int, trial: int = 0) -> jax.Array:
        # The keys PerSim had before the protocol, so that its numbers are
        # unchanged: PRNGKey(seed + offset + trial).
        return jax.random.PRNGKey(seed + STAGE_OFFSETS[stage] + trial)

    def train(self, transitions, key, *, workdir=None, agent_ids=None) -> Simulator:
        del agent_ids   # one simulator for every agent
        return fit(transitions, self.config, key=key, checkpoint_dir=workdir)

    def save(self, trained: Simulator, path) -> None:
        trained.save(path)

    def load(self, path) -> Simulator:
        return Simulator.load(path)

    def dynamics_for_agent(self, trained: Simulator, agent_ids, *, for_planning=True):
        return evaluation.simulator_dynamics_for_agent(trained, list(agent_ids),
                                                       fold=for_planning)


@dataclasses.dataclass(frozen=True)
class TrueEnvMPC(Method):
    """The upper bound: the same planner on each agent's true physics (one
    member), `planning.env_dynamics`."""

    env: Any
    name: ClassVar[str] = "true_env_mpc"
    trains: ClassVar[bool] = False
    predicts: ClassVar[bool] = False

    def key(self, stage: str, seed: int, trial: int = 0) -> jax.Array:
        # Its reward key before the protocol: PRNGKey(seed + 3000 + trial).
        if stage == "reward":
            return jax.random.PRNGKey(seed + 3000 + trial)
        return super().key(stage, seed, trial)

    def dynamics_for_agent(self, trained, agent_ids, *, for_planning=True):
        del trained, agent_ids    # each agent's physics comes from its covariates
        return evaluation.true_env_dynamics_for_agent(self.env)


@dataclasses.dataclass(frozen=True)
class Population(Method):
    """Ablation: the same factorised network with the agent factor removed,
    one simulator for everyone (every agent id set to 0: u is one learned
    vector, absorbed by the state and action factors). Planned and scored
    exactly as PerSim; its gap to PerSim is what personalisation buys."""

    config: TrainConfig
    name: ClassVar[str] = "population"

    def description(self) -> dict:
        return PerSim.description(self)

    def train(self, transitions, key, *, workdir=None, agent_ids=None) -> Simulator:
        del agent_ids
        return fit(pooled(transitions), self.config, key=key, checkpoint_dir=workdir)

    def save(self, trained: Simulator, path) -> None:
        trained.save(path)

    def load(self, path) -> Simulator:
        return Simulator.load(path)

    def dynamics_for_agent(self, trained: Simulator, agent_ids, *, for_planning=True):
        return evaluation.simulator_dynamics_for_agent(trained, [0] * len(agent_ids),
                                                       fold=for_planning)


@dataclasses.dataclass(frozen=True)
class PerAgent(Method):
    """Ablation: the same network trained on each evaluated agent's own
    trajectory alone (one ensemble per agent, nothing shared): what one
    trajectory teaches without the other agents."""

    config: TrainConfig
    name: ClassVar[str] = "per_agent"

    def description(self) -> dict:
        return PerSim.description(self)

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
                   "simulators": [_row(trained, i).to_bytes() for i in range(count)]}
        save_msgpack(path, payload)

    def load(self, path) -> Simulator:
        payload = load_msgpack(path, STACKED_FORMAT, "a file of per-agent simulators")
        return stack_simulators([Simulator.from_bytes(data, os.fspath(path))
                                 for data in payload["simulators"]])

    def dynamics_for_agent(self, trained: Simulator, agent_ids, *, for_planning=True):
        return PerAgentDynamicsForAgent(trained, for_planning)


STACKED_FORMAT = "persim-jax-per-agent-simulators"


def pooled(transitions: Transitions) -> Transitions:
    """The transitions as one agent's (every id 0): the population's data."""
    return transitions.replace(agent_id=np.zeros_like(np.asarray(transitions.agent_id)),
                               num_agents=1, covariates=None, covariate_names=None,
                               agent_keys=None)


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


def _row(stacked: Simulator, index) -> Simulator:
    return jax.tree.map(lambda leaf: leaf[index], stacked)


@struct.dataclass
class PerAgentDynamicsForAgent:
    """Row i -> the dynamics of the i-th of K stacked one-agent simulators."""

    simulators: Simulator
    fold: bool = struct.field(pytree_node=False, default=True)

    def __call__(self, agent_index, covariates):
        del covariates
        simulator = _row(self.simulators, agent_index)
        return evaluation.SimulatorDynamicsForAgent(simulator, None, self.fold)(0, None)
