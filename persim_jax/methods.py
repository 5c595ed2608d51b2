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

from persim_jax import evaluation
from persim_jax.data import Transitions
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

    def key(self, stage: str, seed: int, trial: int = 0) -> jax.Array:
        """The PRNG key of `stage` ("train", "prediction", "reward", "plots")
        for `trial`: distinct per method, independent of the others run."""
        base = jax.random.PRNGKey(seed + STAGE_OFFSETS[stage] + trial)
        return jax.random.fold_in(base, zlib.crc32(self.name.encode()))

    def train(self, transitions: Transitions, key: jax.Array, *,
              workdir: str | os.PathLike | None = None) -> Any:
        """Learns from `transitions`; returns what `save` writes and the
        protocols' factories take. `workdir` holds resumable checkpoints."""
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

    def train(self, transitions, key, *, workdir=None) -> Simulator:
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
