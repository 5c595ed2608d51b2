"""The evaluation protocols: reward (episodes in the true env, `episodes`)
and open-loop prediction error (`prediction`).

    returns = evaluation.run_episodes(key, planner, dynamics_for_agent, env,
                                      env.test_agents, num_episodes=20)      # (5, 20)
    returns = evaluation.run_policy_episodes(key, policy_for_agent, env,
                                             env.test_agents, num_episodes=20)
    errors = evaluation.prediction_error(key, dynamics_for_agent, env,
                                         policies.test_policy(env), env.test_agents)

The dynamics adapters (`simulator_dynamics_for_agent`,
`true_env_dynamics_for_agent`, `contextual`) live in `persim_jax.dynamics`
and the protocols (`DynamicsForAgent`, `ContextualDynamics`, `Policy`,
`PolicyForAgent`) in `persim_jax.types`; both are re-exported here under
their old names.
"""

from __future__ import annotations

from persim_jax.dynamics import (
    SimulatorDynamicsForAgent,
    TrueEnvDynamicsForAgent,
    contextual,
    simulator_dynamics_for_agent,
    true_env_dynamics_for_agent,
)
from persim_jax.evaluation.episodes import (
    BATCH_AXIS,
    Actor,
    PlannerActor,
    PlannerActorForAgent,
    PolicyActor,
    PolicyActorForAgent,
    actor_episode_return,
    episode_return,
    run_actor_episodes,
    run_episodes,
    run_policy_episodes,
)
from persim_jax.evaluation.prediction import (
    PredictionError,
    prediction_error,
    prediction_trajectories,
)
from persim_jax.types import ContextualDynamics, DynamicsForAgent, Policy, PolicyForAgent

__all__ = [
    "Actor", "BATCH_AXIS", "ContextualDynamics", "DynamicsForAgent", "PlannerActor",
    "PlannerActorForAgent", "Policy", "PolicyActor", "PolicyActorForAgent", "PolicyForAgent",
    "PredictionError", "SimulatorDynamicsForAgent", "TrueEnvDynamicsForAgent",
    "actor_episode_return", "contextual", "episode_return", "prediction_error",
    "prediction_trajectories", "run_actor_episodes", "run_episodes", "run_policy_episodes",
    "simulator_dynamics_for_agent", "true_env_dynamics_for_agent",
]
