"""The protocols every module of `persim_jax` shares: dynamics, contextual
dynamics, policies, and the per-agent factories the evaluation protocols take.

Shapes: B a batch (candidates, states), M ensemble members, D the state
dimension, A the continuous action dimension, P the covariates' dimension.

    Dynamics            (obs (B, D) or (M, B, D), action (B,) / (B, A)) -> (M, B, D)
    ContextualDynamics  init(key) / observe(context, obs, action, next_obs) / dynamics(context)
    Policy              (key, obs (D,)) -> action (() int32 or (A,) float32)
    DynamicsForAgent    (row () int, covariates (P,)) -> Dynamics or ContextualDynamics
    PolicyForAgent      (row () int, covariates (P,)) -> Policy
    RewardFn            (obs, action, next_obs) -> reward, broadcasting over leading axes
    TerminatedFn        (next_obs (..., D)) -> (...) bool

The adapters that build them (a learned simulator, the true env) are in
`persim_jax.dynamics`; the planners that consume them in `persim_jax.planning`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

Array = jax.Array


class Dynamics(Protocol):
    """Deterministic next states under each of M ensemble members."""

    def __call__(self, obs: Array, action: Array) -> Array:
        """Next states (M, B, D).

        Args:
          obs: (B, D), every member predicts from the same states; or
            (M, B, D), member m predicts from its own states obs[m] (what
            lets each member propagate its own trajectory, which the
            pessimistic min-over-members score needs).
          action: (B,) int (discrete) or (B, A) float (continuous).
        """


@runtime_checkable
class ContextualDynamics(Protocol):
    """A model whose predictions depend on what the agent did so far in the
    episode (CaDM's context from its latest transitions), for the protocols.

    A `DynamicsForAgent` may return one instead of a plain `Dynamics`. The
    episode loops then carry its context: `init` at the reset, `observe`
    after every real transition (`evaluation.run_episodes`: each env step;
    the prediction protocol: the teacher-forced warm-up steps only, after
    which the context stays fixed for the open loop), and plan or predict on
    `dynamics(context)`. All three are traced inside the compiled programs.
    """

    def init(self, key: Array) -> Any:
        """The context at the start of an episode (a pytree of arrays);
        `key`: the episode's randomness for a stochastic model."""

    def observe(self, context: Any, obs: Array, action: Array, next_obs: Array) -> Any:
        """The context after the real transition obs (D,), action, next_obs (D,)."""

    def dynamics(self, context: Any) -> Dynamics:
        """The `Dynamics` under `context`."""


class Policy(Protocol):
    """Who acts: the paper's test policy in the prediction protocol, a
    model-free method's policy in the reward protocol. A pytree callable, so
    that its parameters are arguments of the compiled program."""

    def __call__(self, key: Array, obs: Array) -> Array:
        """The action for obs (D,): () int32 (discrete) or (A,) float32."""


class DynamicsForAgent(Protocol):
    """Agent -> that agent's dynamics, traced inside the evaluation programs.
    A pytree callable: its array leaves are arguments of the compiled
    program (a simulator's parameters), its other leaves static."""

    def __call__(self, row: Array, covariates: Array) -> Dynamics | ContextualDynamics:
        """The dynamics of the agent of `row` () int (its row in the
        evaluated covariates), covariates (P,) its covariates."""


class PolicyForAgent(Protocol):
    """Agent -> that agent's policy: a model-free method's counterpart of
    `DynamicsForAgent` (a pytree callable too)."""

    def __call__(self, row: Array, covariates: Array) -> Policy:
        """The policy of the agent of `row` () int, covariates (P,)."""


class RewardFn(Protocol):
    """The environment's known reward."""

    def __call__(self, obs: Array, action: Array, next_obs: Array) -> Array:
        """Rewards (...) of obs (..., D), action (...) / (..., A), next_obs (..., D)."""


class TerminatedFn(Protocol):
    """The environment's known termination."""

    def __call__(self, next_obs: Array) -> Array:
        """(...) bool: whether next_obs (..., D) is terminal."""
