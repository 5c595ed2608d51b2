"""True env + MPC, the upper-bound row: the same planner on each agent's true
physics (one member)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from persim_jax.dynamics import true_env_dynamics_for_agent
from persim_jax.methods.base import ModelBased


@dataclasses.dataclass(frozen=True)
class TrueEnvMPC(ModelBased):
    """The run's planner on the true dynamics (`dynamics.env_dynamics`);
    nothing to train, nothing to score for prediction."""

    env: Any
    name: ClassVar[str] = "true_env_mpc"
    predicts: ClassVar[bool] = False

    @classmethod
    def from_settings(cls, settings, *, env, training):
        del settings, training
        return cls(env)

    def key(self, stage: str, seed: int, trial: int = 0) -> jax.Array:
        # Its reward key before the methods protocol: PRNGKey(seed + 3000 + trial).
        if stage == "reward":
            return jax.random.PRNGKey(seed + 3000 + trial)
        return super().key(stage, seed, trial)

    def dynamics_for_agent(self, trained, agent_ids, *, for_planning=True):
        del trained, agent_ids    # each agent's physics comes from its covariates
        return true_env_dynamics_for_agent(self.env)
