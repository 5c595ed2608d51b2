"""True env + MPC, the upper-bound row: the same planner on each agent's true
physics (one member). On a CPU, HalfCheetah's physics in the planner is
MuJoCo's C simulator (`persim_jax.mujoco_physics`); on accelerators, MJX."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from persim_jax.dynamics import PHYSICS, resolve_physics, true_env_dynamics_for_agent
from persim_jax.methods.base import ModelBased


@dataclasses.dataclass(frozen=True)
class TrueEnvMPC(ModelBased):
    """The run's planner on the true dynamics; nothing to train, nothing to
    score for prediction.

    Attributes:
      env: the environment.
      physics: the engine of the planner's dynamics: "auto" (MuJoCo's C
        simulator on the CPU backend for an env with a C model, the env's
        JAX step otherwise), "mjx" or "mujoco" (`dynamics.resolve_physics`).
        The env's real steps are always its JAX step.
    """

    env: Any
    physics: str = "auto"
    name: ClassVar[str] = "true_env_mpc"
    predicts: ClassVar[bool] = False

    def __post_init__(self):
        if self.physics not in PHYSICS:
            raise ValueError(f"physics: must be one of {', '.join(PHYSICS)}; got {self.physics!r}")

    @classmethod
    def from_settings(cls, settings, *, env, training):
        del settings, training
        return cls(env)

    def key(self, stage: str, seed: int, trial: int = 0) -> jax.Array:
        # Its reward key before the methods protocol: PRNGKey(seed + 3000 + trial).
        if stage == "reward":
            return jax.random.PRNGKey(seed + 3000 + trial)
        return super().key(stage, seed, trial)

    def reward_key(self, env) -> dict:
        # The env's own JAX step, the only engine before, keeps the keys
        # results were stored under.
        physics = resolve_physics(env, self.physics)
        return {} if physics == "mjx" else {"physics": physics}

    def dynamics_for_agent(self, trained, agent_ids, *, for_planning=True):
        del trained, agent_ids    # each agent's physics comes from its covariates
        return true_env_dynamics_for_agent(self.env, self.physics)
