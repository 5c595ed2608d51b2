"""Model-predictive control over an ensemble of dynamics (paper, section 5; D.1).

Planners in the optax style: a frozen config dataclass, and a `Planner`
of pure functions,

    planner = planning.random_shooting(config, env.reward, env.terminated)
    state = planner.init()                                   # warm start, empty
    action, state = planner.plan(key, state, obs, dynamics)  # one MPC step

(`make_planner(planner_config(env, **fields), env)` builds the planner that
fits the env's actions; the paper's settings per env are
`experiments.paper.planner(env)`.)

* Random shooting (`shooting`, discrete actions): uniform candidate
  sequences, candidate 0 is the previous best plan shifted by one step; play
  the first action of the best candidate.
* CEM (`cem`, continuous actions in a box): truncated-normal samples,
  elites, 1 + R rounds with smoothing; play the mean first action of the last
  round's elites; warm start from the shifted smoothed mean.
* iCEM (`icem`, Pinneri et al. 2020): coloured noise, a shrinking
  population, carried elites.

Every planner scores sequences with the objective of `objective` (its
config inherits `ObjectiveConfig`): discounted member returns combined by a
risk strategy (min over members, the paper; or the mean). Planners only see a
dynamics callable (`persim_jax.types.Dynamics`) and the environment's known
reward and termination, so the same code plans on a learned `Simulator`
(M = 5 members, `persim_jax.dynamics.simulator_dynamics`) and on the true
environment with one agent's physics (M = 1, `persim_jax.dynamics.env_dynamics`,
the paper's "True env + MPC" row).

A new planner: its module (a config inheriting `ObjectiveConfig`, a factory
`(config, reward_fn, terminated_fn) -> Planner`) and one line in `PLANNERS`.
"""

from __future__ import annotations

from persim_jax.dynamics import env_dynamics, simulator_dynamics
from persim_jax.planning.base import Planner
from persim_jax.planning.cem import CEMConfig, CEMState, cem
from persim_jax.planning.icem import ICEMConfig, ICEMState, colored_noise, icem
from persim_jax.planning.objective import (
    AGGREGATIONS,
    PROPAGATIONS,
    RISK_STRATEGIES,
    Average,
    ObjectiveConfig,
    ReturnAccumulator,
    WorstCase,
    aggregate,
    member_returns,
    score_sequences,
    shared_prefix_depth,
)
from persim_jax.planning.rollout import CANDIDATE_AXIS, CPU_ROLLOUT_CHUNK
from persim_jax.planning.shooting import RandomShootingConfig, RandomShootingState, random_shooting
from persim_jax.types import Dynamics, RewardFn, TerminatedFn

# Config type -> the function that builds its planner,
# `(config, reward_fn, terminated_fn) -> Planner`.
PLANNERS = {
    RandomShootingConfig: random_shooting,
    CEMConfig: cem,
    ICEMConfig: icem,
}


def planner_config(env, **fields) -> RandomShootingConfig | CEMConfig:
    """A planner config for `env`: a `RandomShootingConfig` with
    num_actions=env.num_actions for discrete actions, a `CEMConfig` with
    action_dim=env.action_dim for continuous ones (unless given); the other
    fields as given, the dataclass defaults otherwise. The paper's fields per
    env: `experiments.paper.planner_config(env)`."""
    if env.discrete_actions:
        return RandomShootingConfig(**{"num_actions": env.num_actions, **fields})
    return CEMConfig(**{"action_dim": env.action_dim, **fields})


def make_planner(config, env) -> Planner:
    """The planner of `config` (found in `PLANNERS` by the config's type) with
    the env's known reward and termination."""
    for config_type, factory in PLANNERS.items():
        if isinstance(config, config_type):
            return factory(config, env.reward, env.terminated)
    names = [config_type.__name__ for config_type in PLANNERS]
    raise ValueError(f"config: expected a {', '.join(names[:-1])} or {names[-1]}, got "
                     f"{type(config).__name__}")


__all__ = [
    "AGGREGATIONS", "Average", "CANDIDATE_AXIS", "CEMConfig", "CEMState", "CPU_ROLLOUT_CHUNK",
    "Dynamics", "ICEMConfig", "ICEMState", "ObjectiveConfig", "PLANNERS", "PROPAGATIONS",
    "Planner", "RISK_STRATEGIES", "RandomShootingConfig", "RandomShootingState",
    "ReturnAccumulator", "RewardFn", "TerminatedFn", "WorstCase", "aggregate", "cem",
    "colored_noise", "env_dynamics", "icem", "make_planner", "member_returns", "planner_config",
    "random_shooting", "score_sequences", "shared_prefix_depth", "simulator_dynamics",
]
