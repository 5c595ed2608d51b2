"""The planner protocol: a NamedTuple of pure functions and their config
(optax's `GradientTransformation` shape)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

from persim_jax.types import Dynamics

Array = jax.Array


class Planner(NamedTuple):
    """A planner: pure functions and their config.

    Attributes:
      init: `init() -> state`, the state at the start of an episode (no warm
        start yet).
      plan: `plan(key, state, obs (D,), dynamics) -> (action, state)`; the
        action is () int32 (discrete) or (A,) float32 (continuous), the state
        carries the warm start to the next call.
      config: the planner's config dataclass.
      sequence: `sequence(key, state, obs, dynamics) -> (sequence (H,) or
        (H, A), state)`, the whole action sequence whose first action `plan`
        plays (for measuring a planner's objective, and the plan a decision
        recommends; None for a planner that has none).
    """

    init: Callable[[], Any]
    plan: Callable[[Array, Any, Array, Dynamics], tuple[Array, Any]]
    config: Any
    sequence: Callable[[Array, Any, Array, Dynamics], tuple[Array, Any]] | None = None
