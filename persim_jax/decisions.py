"""Decisions on a trained simulator: a plan per agent, and each policy's value
per agent with the ensemble's spread.

    env = SimulatorEnv(simulator, reward_fn, initial_states, ...)
    plans = recommend(key, planner, env, agents, last_states)        # Recommendation
    values = policy_values(key, env, actor_for_agent, agents, starts, horizon)   # (K, S, M)

The user's reward is a per-transition function `reward(obs (D,), action,
next_obs (D,)) -> ()`; `per_transition` makes it (and a termination) the
broadcasting `RewardFn` the planners call on batches.

A policy's value for agent k is its undiscounted return over `horizon` steps
on agent k's simulator, from the agent's own logged states (`starts`), under
each ensemble member m (member m drives every step, `SimulatorEnv`), then the
mean over the starts: (K, M) values, whose min / mean / max over members is
the ensemble's spread. Who acts is an `evaluation.episodes.Actor`: the logged
actions replayed (`LoggedActor`), MPC on the agent's own ensemble
(`evaluation.episodes.PlannerActor`), or a user's policy (`PolicyActor`).

Continuous actions are planned in the box [−1, 1]^A and mapped linearly to the
action range (`ActionBox`), so a per-dimension range needs nothing of the
planners.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from persim_jax.dynamics import simulator_dynamics
from persim_jax.evaluation.episodes import Actor, PlannerActor, play
from persim_jax.planning import Planner

Array = jax.Array


# ---------------------------------------------------------------------------
# The user's functions as the planners' batched ones


def per_transition(fn: Callable, arguments: int) -> Callable:
    """`fn` on one transition -> the same function broadcasting over leading
    axes (the planners' `RewardFn` / `TerminatedFn`).

    Args:
      fn: reward(obs (D,), action, next_obs (D,)) -> () (arguments=3) or
        terminated(next_obs (D,)) -> () (arguments=1).
    """

    def batched(*args):
        obs = args[-1] if arguments == 1 else args[0]
        lead = jnp.shape(obs)[:-1]
        flat = [jnp.reshape(jnp.broadcast_to(a, (*lead, *jnp.shape(a)[len(lead):])),
                            (-1, *jnp.shape(a)[len(lead):])) for a in args]
        return jax.vmap(fn)(*flat).reshape(lead)

    return batched


class ActionBox(NamedTuple):
    """The linear map from the planners' box [−1, 1]^A to [low, high]."""

    low: Array
    high: Array

    def to_env(self, action: Array) -> Array:
        return self.low + (jnp.clip(action, -1.0, 1.0) + 1.0) * 0.5 * (self.high - self.low)

    def reward(self, reward_fn: Callable) -> Callable:
        """A `RewardFn` of box actions."""
        return lambda obs, action, next_obs: reward_fn(obs, self.to_env(action), next_obs)

    def dynamics(self, dynamics: Callable) -> Callable:
        """A `Dynamics` of box actions."""
        return lambda obs, action: dynamics(obs, self.to_env(action))


# ---------------------------------------------------------------------------
# Actors


class LoggedActor(NamedTuple):
    """Replays a logged action sequence (H,) / (H, A); state: the step index."""

    actions: Array

    def init(self, key):
        return jnp.zeros((), jnp.int32)

    def act(self, key, state, obs):
        return self.actions[jnp.minimum(state, self.actions.shape[0] - 1)], state + 1

    def observe(self, state, obs, action, next_obs):
        return state


class BoxActor(NamedTuple):
    """An actor that chooses box actions (a planner on `ActionBox` dynamics),
    acting with env actions."""

    actor: Any
    box: ActionBox

    def init(self, key):
        return self.actor.init(key)

    def act(self, key, state, obs):
        action, state = self.actor.act(key, state, obs)
        return self.box.to_env(action), state

    def observe(self, state, obs, action, next_obs):
        return self.actor.observe(state, obs, action, next_obs)


def planner_actor(planner: Planner, simulator, agent, box: ActionBox | None = None) -> Actor:
    """MPC on `agent`'s own ensemble of `simulator` (every member, the
    planner's risk strategy), with box actions when `box` is given."""
    dynamics = simulator_dynamics(simulator, agent)
    if box is None:
        return PlannerActor(planner, dynamics)
    return BoxActor(PlannerActor(planner, box.dynamics(dynamics)), box)


# ---------------------------------------------------------------------------
# Values


def rollout_return(key, actor: Actor, env, params, state, horizon: int) -> Array:
    """() undiscounted return of `horizon` steps of `actor` on `env` from
    `state` (any gymnax env: a `SimulatorEnv` state from `state_at`, or a
    true env's from `state_from_obs`); rewards stop at the first
    termination. Jittable, vmappable."""
    return play(actor, actor.init(key), env, params, env.get_obs(state, params), state,
                jax.random.split(key, horizon))


def policy_values(key, env, actor_for: Callable, agents, starts, horizon: int, *,
                  logged=None, members: int | None = None, env_agents=None) -> Array:
    """(K, S, M) returns of an actor per agent, start state and member.

    Args:
      key: PRNG key (one per (agent, start); members share it, so that they
        differ by their dynamics only).
      env: the `SimulatorEnv` whose agents are valued.
      actor_for: (agent () int, logged (H, ...)) -> Actor, traced.
      agents: (K,) agent indices in `env`'s simulator.
      starts: (K, S, D) start states per agent.
      horizon: steps per rollout.
      logged: (K, S, H[, A]) the logged actions after each start (what a
        `LoggedActor` replays); None gives the actor zeros.
      members: how many members drive rollouts (default: the ensemble's).
      env_agents: (K,) the agents' indices in `env` when they differ from
        `agents` (the actor's): e.g. the population model's one agent 0,
        valuing a policy that plans on each agent's own simulator.
    """
    agents = jnp.asarray(agents, jnp.int32)
    starts = jnp.asarray(starts, jnp.float32)
    num_agents, num_starts = starts.shape[:2]
    if logged is None:
        logged = jnp.zeros((num_agents, num_starts, horizon), jnp.float32)
    members = env.simulator.ensemble_size if members is None else members
    keys = jax.random.split(key, num_agents * num_starts).reshape(num_agents, num_starts, -1)

    env_agents = agents if env_agents is None else jnp.asarray(env_agents, jnp.int32)

    def one(key, agent, env_agent, obs, actions, member):
        params = env.agent_params(0).replace(agent=env_agent)
        return rollout_return(key, actor_for(agent, actions), env, params,
                              env.state_at(obs, member), horizon)

    over_members = jax.vmap(one, in_axes=(None, None, None, None, None, 0))
    over_starts = jax.vmap(over_members, in_axes=(0, None, None, 0, 0, None))
    over_agents = jax.vmap(over_starts, in_axes=(0, 0, 0, 0, 0, None))
    return jax.jit(over_agents)(keys, agents, env_agents, starts, jnp.asarray(logged),
                                jnp.arange(members, dtype=jnp.int32))


class Recommendation(NamedTuple):
    """The planner's plan per agent.

    Attributes:
      action: (K,) int or (K, A) float, the next action to take.
      sequence: (K, H[, A]) the whole plan the action starts.
      member_returns: (K, M) the plan's return under each member (the
        planner's horizon and discount), its spread over the ensemble.
    """

    action: Array
    sequence: Array
    member_returns: Array


def recommend(key, planner: Planner, simulator, agents, obs, reward_fn, terminated_fn=None, *,
              box: ActionBox | None = None) -> Recommendation:
    """Each agent's plan from its state obs (K, D) on its own ensemble.

    `reward_fn` / `terminated_fn` are the planner's (batched; box actions when
    `box` is given); the returned actions are env actions."""
    from persim_jax.planning import member_returns

    if planner.sequence is None:
        raise ValueError("planner: this planner does not expose its plans (no `sequence`)")
    config = planner.config
    num_actions = getattr(config, "num_actions", None)

    def one(key, agent, obs):
        dynamics = simulator_dynamics(simulator, agent)
        if box is not None:
            dynamics = box.dynamics(dynamics)
        sequence, _ = planner.sequence(key, planner.init(), obs, dynamics)
        returns = member_returns(dynamics, reward_fn, terminated_fn, obs, sequence[None],
                                 discount=config.discount, propagation=config.propagation,
                                 num_actions=num_actions, shard_candidates=False)[:, 0]
        if box is not None:
            sequence = box.to_env(sequence)
        return sequence, returns

    agents = jnp.asarray(agents, jnp.int32)
    keys = jax.random.split(key, agents.shape[0])
    sequences, returns = jax.jit(jax.vmap(one))(keys, agents, jnp.asarray(obs, jnp.float32))
    return Recommendation(sequences[:, 0], sequences, returns)


def summarize(values) -> dict:
    """{"mean", "min", "max"} over members of (M,) values (already averaged
    over start states)."""
    values = np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "min": float(values.min()),
            "max": float(values.max())}


def ranking(values: dict, tolerance: float = 1e-6) -> dict:
    """The policies ranked by one agent's ensemble-mean value, and how sure
    the ensemble is.

    Args:
      values: {policy name: (M,) values of that agent}.
      tolerance: values closer than tolerance · (1 + |best|) are tied.

    Returns:
      {"order": [names, best first], "best": the first name, or None when
      several tie for first, "tied": [the names tied for first],
      "agreement": the share of members whose own values put `best` at
      least level with every other policy (1.0 for a tie)}.
    """
    names = list(values)
    table = np.stack([np.asarray(values[name], np.float64) for name in names])   # (P, M)
    means = table.mean(axis=1)
    order = np.argsort(-means, kind="stable")
    top = means[order[0]]
    tied = [names[i] for i in order if top - means[i] <= tolerance * (1.0 + abs(top))]
    best = order[0]
    level = table[best] >= table.max(axis=0) - tolerance * (1.0 + np.abs(table[best]))
    return {"order": [names[i] for i in order], "best": names[best] if len(tied) == 1 else None,
            "tied": tied, "agreement": float(np.mean(level))}
