"""Every agent's learned simulator as a gymnax environment.

    env = SimulatorEnv(simulator, reward_fn, initial_states, max_steps=200)
    params = env.agent_params(["adult#001", "adult#007"])   # or indices; batched
    obs, state = jax.vmap(env.reset)(keys, params)
    obs, state, reward, done, info = jax.vmap(env.step)(keys, state, actions, params)

What a user hands to PPO or SAC from any JAX RL library: gymnax's
conventions (stateless, `flax.struct` params and state, `reset(key, params)`,
`step(key, state, action, params)` with auto-reset, gymnax spaces), the
five-tuple `step` of the project's own envs (`envs.base.HeterogeneousEnv`).

One agent's params are its index in the simulator and the episode cap; the
physics is the simulator's, so `vmap` over params steps many agents at once.
Which ensemble member drives a step is the `member` setting:

  * "sample" (default): one member drawn at every reset, kept for the episode
    (the ensemble's disagreement becomes episode-to-episode variation, as in
    PETS' trajectory sampling);
  * an integer m: always member m;
  * "mean": the ensemble-mean next state.

A reset draws the agent's start state uniformly from its rows of
`initial_states` (e.g. its logged first states).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import environment, spaces

MEMBER_MODES = ("sample", "mean")


@struct.dataclass
class SimulatorParams:
    """One agent's params (leaves () for one agent, (K,) for a batch).

    Attributes:
      agent: the agent's index 0..N-1 in the simulator.
      max_steps_in_episode: the episode cap.
    """

    agent: jax.Array
    max_steps_in_episode: jax.Array


@struct.dataclass
class SimulatorState:
    """An episode's state.

    Attributes:
      obs: (D,) the current state.
      member: () int32, the ensemble member driving this episode (ignored
        with member="mean").
      time: () int32, steps taken in the episode.
    """

    obs: jax.Array
    member: jax.Array
    time: jax.Array


class SimulatorEnv(environment.Environment):
    """The agents of a trained `Simulator` as one gymnax environment.

    Args:
      simulator: a trained `persim_jax.Simulator` of N agents, M members.
      reward_fn: `reward(obs (D,), action, next_obs (D,)) -> ()`: the
        transition's reward, a pure JAX function (vmapped by us).
      initial_states: (S, D) start states, with `initial_agents`; or a
        mapping from agent (index or the data's id) to its (S_k, D) states.
      initial_agents: (S,) agent index of each row of `initial_states` (an
        array); None with a mapping.
      terminated_fn: optional `terminated(next_obs (D,)) -> ()` bool.
      max_steps: episode cap.
      member: "sample", "mean" or an integer member index (see the module).
      action_low, action_high: continuous actions: the box actions are
        clipped to, scalars or (A,) (default [-1, 1]); ignored for discrete
        actions.
    """

    def __init__(self, simulator, reward_fn: Callable, initial_states, *,
                 initial_agents=None, terminated_fn: Callable | None = None,
                 max_steps: int = 200, member: int | str = "sample",
                 action_low=-1.0, action_high=1.0):
        super().__init__()
        self.simulator = simulator
        self.reward_fn = reward_fn
        self.terminated_fn = terminated_fn
        self.max_steps = _positive(max_steps, "max_steps")
        self.member = _member(member, simulator.ensemble_size)
        self.initial_states, self.initial_agents = _initial_states(
            simulator, initial_states, initial_agents)
        config = simulator.config
        if not config.discrete:
            low = np.broadcast_to(np.asarray(action_low, np.float32), (config.action_dim,))
            high = np.broadcast_to(np.asarray(action_high, np.float32), (config.action_dim,))
            if not np.all(np.isfinite(low) & np.isfinite(high) & (low < high)):
                raise ValueError(f"action_low, action_high: need finite low < high per "
                                 f"dimension; got {low.tolist()}, {high.tolist()}")
            self.action_low, self.action_high = jnp.asarray(low), jnp.asarray(high)

    # -- agents ---------------------------------------------------------------

    @property
    def name(self) -> str:
        return "PersimSimulator"

    @property
    def num_agents(self) -> int:
        return self.simulator.num_agents

    @property
    def num_actions(self) -> int:
        """Discrete actions: their number; continuous ones: the dimension A."""
        config = self.simulator.config
        return config.num_actions if config.discrete else config.action_dim

    @property
    def default_params(self) -> SimulatorParams:
        return self.agent_params(0)

    def agent_params(self, agents) -> SimulatorParams:
        """Params of one agent or a batch: indices 0..N-1 or the data's ids
        (`Simulator.agent_indices`); a list gives leaves of shape (K,)."""
        index = np.asarray(self.simulator.agent_indices(agents), np.int32)
        return SimulatorParams(agent=jnp.asarray(index),
                               max_steps_in_episode=jnp.full(index.shape, self.max_steps,
                                                             jnp.int32))

    # -- spaces ---------------------------------------------------------------

    def action_space(self, params: SimulatorParams | None = None):
        config = self.simulator.config
        if config.discrete:
            return spaces.Discrete(config.num_actions)
        return spaces.Box(self.action_low, self.action_high, (config.action_dim,), jnp.float32)

    def observation_space(self, params: SimulatorParams | None = None):
        return spaces.Box(-jnp.inf, jnp.inf, (self.simulator.obs_dim,), jnp.float32)

    # -- dynamics -------------------------------------------------------------

    def next_obs(self, state: SimulatorState, action, params: SimulatorParams) -> jax.Array:
        """(D,) the next state under the episode's member (or the mean)."""
        action = self._action(action)
        members = self.simulator.predict(params.agent, state.obs, action)     # (M, D)
        if self.member == "mean":
            return jnp.mean(members, axis=0)
        return members[state.member]

    def _action(self, action):
        if self.simulator.config.discrete:
            return jnp.asarray(action, jnp.int32)
        return jnp.clip(jnp.asarray(action, jnp.float32), self.action_low, self.action_high)

    def step_env(self, key, state: SimulatorState, action, params: SimulatorParams):
        """One step without reset: (obs, state, reward, terminated, info)."""
        del key
        action = self._action(action)
        next_obs = self.next_obs(state, action, params)
        reward = jnp.asarray(self.reward_fn(state.obs, action, next_obs), jnp.float32)
        terminated = (jnp.asarray(self.terminated_fn(next_obs), bool)
                      if self.terminated_fn is not None else jnp.array(False))
        # A simulator driven far from the data can diverge: a non-finite state
        # ends the episode rather than poison the learner's batch.
        terminated = terminated | ~jnp.all(jnp.isfinite(next_obs))
        state = SimulatorState(next_obs, state.member, state.time + 1)
        return next_obs, state, reward, terminated, {"discount": 1.0 - terminated}

    def reset_env(self, key, params: SimulatorParams):
        """A start state of the agent's, and the episode's member."""
        start_key, member_key = jax.random.split(key)
        mine = self.initial_agents == params.agent
        row = jax.random.categorical(start_key, jnp.where(mine, 0.0, -jnp.inf))
        obs = self.initial_states[row]
        if isinstance(self.member, int):
            member = jnp.asarray(self.member, jnp.int32)
        else:
            member = jax.random.randint(member_key, (), 0, self.simulator.ensemble_size)
        return obs, SimulatorState(obs, member, jnp.zeros((), jnp.int32))

    def state_at(self, obs, member=0) -> SimulatorState:
        """The state whose observation is obs (D,) at time 0, driven by
        `member` (for rollouts that start from a given state)."""
        return SimulatorState(jnp.asarray(obs, jnp.float32), jnp.asarray(member, jnp.int32),
                              jnp.zeros((), jnp.int32))

    def get_obs(self, state: SimulatorState, params=None, key=None) -> jax.Array:
        return state.obs

    def is_terminated(self, state: SimulatorState, params=None) -> jax.Array:
        if self.terminated_fn is None:
            return jnp.array(False)
        return jnp.asarray(self.terminated_fn(state.obs), bool)

    def step(self, key: jax.Array, state: SimulatorState, action,
             params: SimulatorParams | None = None
             ) -> tuple[jax.Array, SimulatorState, jax.Array, jax.Array, dict[str, Any]]:
        """Steps one agent and auto-resets at the end of an episode.

        Returns (like `envs.base.HeterogeneousEnv.step`):
          obs (D,): the next state, or the reset state if done.
          state, reward (), done (): terminated or truncated (the cap).
          info: `terminated`, `truncated`, `final_observation`, `discount`.
        """
        obs, state, reward, terminated, truncated, info = super().step(
            key, state, action, params)
        return obs, state, reward, jnp.logical_or(terminated, truncated), info


def _positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: must be a positive integer; got {value!r}")
    return int(value)


def _member(member, ensemble_size: int):
    if isinstance(member, str):
        if member not in MEMBER_MODES:
            raise ValueError(f"member: must be an integer in 0..{ensemble_size - 1} or one of "
                             f"{MEMBER_MODES}; got {member!r}")
        return member
    if (isinstance(member, bool) or not isinstance(member, (int, np.integer))
            or not 0 <= member < ensemble_size):
        raise ValueError(f"member: must be an integer in 0..{ensemble_size - 1} or one of "
                         f"{MEMBER_MODES}; got {member!r}")
    return int(member)


def _initial_states(simulator, states, agents):
    """((S, D) float32 states, (S,) int32 agents), checked: every agent of
    the simulator needs at least one start state."""
    if isinstance(states, dict):
        if agents is not None:
            raise ValueError("initial_agents: give it only with an array of initial_states")
        rows, owners = [], []
        for agent, agent_states in states.items():
            agent_states = np.asarray(agent_states, np.float32).reshape(-1, simulator.obs_dim)
            rows.append(agent_states)
            owners.append(np.full(len(agent_states), simulator.agent_indices(agent), np.int32))
        states, agents = np.concatenate(rows), np.concatenate(owners)
    states = np.asarray(states, np.float32)
    if states.ndim != 2 or states.shape[1] != simulator.obs_dim:
        raise ValueError(f"initial_states: expected (S, {simulator.obs_dim}) states; got shape "
                         f"{states.shape}")
    if not np.all(np.isfinite(states)):
        raise ValueError("initial_states: must be finite")
    if agents is None:
        raise ValueError("initial_agents: needed with an array of initial_states (the agent "
                         "of each row)")
    agents = np.asarray(simulator.agent_indices(np.asarray(agents)), np.int32).reshape(-1)
    if agents.shape != (len(states),):
        raise ValueError(f"initial_agents: expected {len(states)} agents, one per state; got "
                         f"shape {agents.shape}")
    missing = np.setdiff1d(np.arange(simulator.num_agents), agents)
    if missing.size:
        raise ValueError(f"initial_states: agents {missing[:5].tolist()} have no start state")
    return jnp.asarray(states), jnp.asarray(agents)


def logged_initial_states(transitions):
    """((S, D), (S,)) each agent's first logged state in `transitions` (its
    first transition in time order), for `SimulatorEnv(initial_states=...,
    initial_agents=...)`."""
    agent_id = np.asarray(transitions.agent_id)
    _, first = np.unique(agent_id, return_index=True)
    return np.asarray(transitions.obs)[first], agent_id[first]

