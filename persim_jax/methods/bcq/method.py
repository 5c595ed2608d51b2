"""BCQ-P and BCQ-A as methods of the harness: how it builds and trains them,
with their config (`BCQConfig`, from `model`)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from persim_jax.methods.base import ModelFree, Trains
from persim_jax.methods.bcq.model import BCQConfig
from persim_jax.methods.bcq.train import BCQPolicies, fit
from persim_jax.types import PolicyForAgent


@dataclasses.dataclass(frozen=True)
class BCQP(ModelFree, Trains):
    """BCQ-P: one BCQ policy trained on every agent's transitions."""

    config: BCQConfig = BCQConfig()
    name: ClassVar[str] = "bcq_p"
    settings: ClassVar[dict] = {
        "bcq_iterations": ("iterations", "BCQ gradient steps (paper: 5.5e5)."),
    }

    @classmethod
    def from_settings(cls, settings, *, env, training):
        del env, training
        return cls(BCQConfig(**settings))

    def train(self, transitions, key, *, workdir=None, agent_ids=None) -> BCQPolicies:
        del agent_ids                       # one policy for everyone
        return fit(transitions, self.config, key=key, checkpoint_dir=workdir)

    def save(self, trained: BCQPolicies, path) -> None:
        trained.save(path)

    def load(self, path) -> BCQPolicies:
        return BCQPolicies.load(path)

    def policy_for_agent(self, trained: BCQPolicies, agent_ids) -> PolicyForAgent:
        return trained.policy_for_agent(agent_ids)


@dataclasses.dataclass(frozen=True)
class BCQA(BCQP):
    """BCQ-A: one BCQ policy per evaluated agent, on its own trajectory."""

    name: ClassVar[str] = "bcq_a"

    def train(self, transitions, key, *, workdir=None, agent_ids=None) -> BCQPolicies:
        if agent_ids is None or not len(agent_ids):
            raise ValueError("agent_ids: bcq_a trains one policy per evaluated agent; "
                             "give their ids")
        return fit(transitions, self.config, key=key, agent_ids=agent_ids,
                   checkpoint_dir=workdir)
