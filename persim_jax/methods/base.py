"""The protocol of a compared method: what the harness asks of every row of
the paper's tables.

A method is a frozen dataclass holding its own config. What it can do is said
by the protocols it implements, not by flags:

  * `Trains`: learns from the offline `Transitions` (`train`, `save`, `load`);
  * `ModelBased`: hands each evaluated agent's dynamics (`dynamics_for_agent`):
    the prediction protocol scores its open-loop predictions and the MPC
    planner plans on it;
  * `ModelFree`: hands each evaluated agent's policy (`policy_for_agent`):
    reward only.

    method = PerSim(TrainConfig(rank=5, epochs=300))
    trained = method.train(transitions, method.key("train", seed=0), workdir="runs/ckpt")
    dynamics_for_agent = method.dynamics_for_agent(trained, agent_ids=[0, 1, 2, 3, 4])
"""

from __future__ import annotations

import abc
import dataclasses
import os
import zlib
from typing import Any, ClassVar, Mapping, Sequence

import jax

from persim_jax.data import Transitions, jsonable
from persim_jax.types import DynamicsForAgent, PolicyForAgent

# Keys of stage s, trial t, seed k: PRNGKey(k + STAGE_OFFSETS[s] + t), folded
# with the method's name (see `Method.key`).
STAGE_OFFSETS = {"train": 0, "prediction": 1000, "reward": 2000, "plots": 4000}


def stage_key(stage: str, seed: int, trial: int = 0) -> jax.Array:
    """PRNGKey(seed + STAGE_OFFSETS[stage] + trial): a stage's key before any
    method's name is folded in (PerSim's keys, the run's figures)."""
    return jax.random.PRNGKey(seed + STAGE_OFFSETS[stage] + trial)


class Method(abc.ABC):
    """One compared method of the harness.

    Class attributes:
      name: its key in `results.json["methods"]`, `--methods` and the registry.
      settings: {flag: (config field, help)}: the command-line flags that set
        fields of its config (`experiments.cli` defines them; methods sharing a
        flag share its value).
    """

    name: ClassVar[str]
    settings: ClassVar[Mapping[str, tuple[str, str]]] = {}

    @classmethod
    @abc.abstractmethod
    def from_settings(cls, settings: Mapping[str, Any], *, env, training) -> "Method":
        """The method configured by `settings` ({config field: value}, from its
        preset and flags) for `env`; `training` is the run's PerSim
        `TrainConfig` (the ablations train the same network). ValueError names
        a bad setting."""

    def description(self) -> dict:
        """What the method's numbers depend on besides data, seed and trial
        (JSON-able): part of the harness's cache keys."""
        config = getattr(self, "config", None)
        return {} if config is None else jsonable(dataclasses.asdict(config))

    def training_description(self) -> dict:
        """What its training depends on besides data, seed and trial: the
        training stage's cache key. `description()` unless some of it matters
        only after training (CaDM's planning particles), so that changing
        that retrains nothing."""
        return self.description()

    def key(self, stage: str, seed: int, trial: int = 0) -> jax.Array:
        """The PRNG key of `stage` ("train", "prediction", "reward", "plots")
        for `trial`: distinct per method, independent of the others run."""
        return jax.random.fold_in(stage_key(stage, seed, trial), zlib.crc32(self.name.encode()))


class Trains(abc.ABC):
    """A method that learns from the offline transitions."""

    @abc.abstractmethod
    def train(self, transitions: Transitions, key: jax.Array, *,
              workdir: str | os.PathLike | None = None,
              agent_ids: Sequence[int] | None = None) -> Any:
        """Learns from `transitions`; returns what `save` writes and the
        protocols' factories take. `workdir` holds resumable checkpoints;
        `agent_ids` are the agents evaluated later (a per-agent method trains
        one model for each of them; the others ignore it)."""

    @abc.abstractmethod
    def save(self, trained: Any, path: str | os.PathLike) -> None:
        """Writes what `train` returned to `path` (atomically)."""

    @abc.abstractmethod
    def load(self, path: str | os.PathLike) -> Any:
        """What `save` wrote; ValueError names a damaged or foreign file."""


class ModelBased(Method):
    """A method that hands dynamics: scored by the prediction protocol (unless
    `predicts` is False) and planned on by the MPC planner."""

    # The true env's predictions are exact by construction: not scored.
    predicts: ClassVar[bool] = True

    @abc.abstractmethod
    def dynamics_for_agent(self, trained: Any, agent_ids: Sequence[int], *,
                           for_planning: bool = True) -> DynamicsForAgent:
        """Row i of the evaluated covariates -> agent `agent_ids[i]`'s
        dynamics. `for_planning=False` asks for the forward pass the
        prediction protocol scores."""

    def planner_config(self, config):
        """The planner config this method plans with, given the run's: the
        same by default; a method with its own planning objective (CaDM)
        changes fields."""
        return config

    def reward_key(self, env) -> dict:
        """What this method's MPC returns depend on besides the run's planner,
        episodes and seeds, for the reward stage's cache key: nothing by
        default; True env + MPC names a physics engine other than the env's
        own JAX step."""
        del env
        return {}


class ModelFree(Method):
    """A method that hands a policy per agent: reward only."""

    @abc.abstractmethod
    def policy_for_agent(self, trained: Any, agent_ids: Sequence[int]) -> PolicyForAgent:
        """Row i of the evaluated covariates -> agent `agent_ids[i]`'s policy
        `policy(key, obs) -> action`."""
