"""Offline transitions of many agents: the container, its construction and validation.

PerSim learns from one logged trajectory per agent. Everything the model needs
is a flat table of transitions `(obs, action, next_obs, agent_id)`; rewards and
done flags travel with it for the planner and the reports, and per-agent
covariates (the hidden physics: gravity, pole length, ...) only for evaluation
and plots, never for training.

`make_transitions` builds a dataset from host arrays and `from_rollouts` from
(N, T, ...) rollouts; both validate at the edge (`validate_transitions`) and
raise `ValueError` naming the field and the row. `time_ordered_split` holds
out the end of every agent's trajectory.
"""

from __future__ import annotations

import logging
from typing import Sequence

import jax
import numpy as np
from flax import struct

from persim_jax.data.checks import FLOAT32_MAX, plain, preview

logger = logging.getLogger(__name__)


@struct.dataclass
class Transitions:
    """T logged transitions of `num_agents` agents.

    Attributes:
      obs: (T, D) float32 states s_t.
      action: (T,) int32 for discrete actions or (T, A) float32 for continuous
        ones.
      next_obs: (T, D) float32 states s_{t+1} reached from (s_t, a_t).
      reward: (T,) float32 rewards r_t.
      done: (T,) bool, next_obs is terminal (D4RL `terminals`).
      timeout: (T,) bool, the episode was cut by a time cap after this step
        (D4RL `timeouts`); next_obs is still the true next state.
      agent_id: (T,) int32 in 0..num_agents-1.
      covariates: optional (num_agents, P) float32 agent parameters, for
        evaluation and plots only (the model never sees them).
      num_agents: N, static.
      num_actions: number of discrete actions (static), None for continuous
        actions.
      agent_keys: optional original agent ids (static), `agent_keys[i]` is the
        id in the source file of agent i; None when the ids already were
        0..N-1.
      state_names: optional names of the D state dimensions (static), e.g.
        the long-format file's state columns.
      covariate_names: optional names of the P covariates (static), e.g. the
        file's covariate columns.
    """

    obs: jax.Array
    action: jax.Array
    next_obs: jax.Array
    reward: jax.Array
    done: jax.Array
    timeout: jax.Array
    agent_id: jax.Array
    covariates: jax.Array | None = None
    num_agents: int = struct.field(pytree_node=False, default=0)
    num_actions: int | None = struct.field(pytree_node=False, default=None)
    agent_keys: tuple | None = struct.field(pytree_node=False, default=None)
    state_names: tuple | None = struct.field(pytree_node=False, default=None)
    covariate_names: tuple | None = struct.field(pytree_node=False, default=None)

    @property
    def num_transitions(self) -> int:
        return int(np.shape(self.obs)[0])

    @property
    def obs_dim(self) -> int:
        return int(np.shape(self.obs)[1])

    @property
    def discrete(self) -> bool:
        return self.num_actions is not None

    @property
    def action_dim(self) -> int | None:
        """A for continuous actions, None for discrete ones."""
        return None if self.discrete else int(np.shape(self.action)[1])

    @property
    def delta(self) -> jax.Array:
        """(T, D) next_obs - obs, the model's target."""
        return self.next_obs - self.obs

    def transitions_per_agent(self) -> np.ndarray:
        """(N,) number of transitions of each agent."""
        return np.bincount(np.asarray(self.agent_id), minlength=self.num_agents)

    def select(self, index) -> "Transitions":
        """The transitions at `index` (an integer array or boolean mask over T).
        Agents keep their ids; the result is not re-validated (an agent may have
        no transitions left)."""
        take = lambda x: np.asarray(x)[np.asarray(index)]
        return self.replace(obs=take(self.obs), action=take(self.action),
                            next_obs=take(self.next_obs), reward=take(self.reward),
                            done=take(self.done), timeout=take(self.timeout),
                            agent_id=take(self.agent_id))


def time_ordered_split(transitions: Transitions,
                       held_out_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Holds out the end of every agent's trajectory (not a random sample).

    An agent with n transitions keeps its first n - h for training and holds
    out its last h = round(held_out_fraction · n), at least 1 and at most
    n - 1 (an agent with a single transition holds out none). Transitions
    are in time order within each agent, as the loaders keep them.

    Args:
      transitions: T transitions of N agents.
      held_out_fraction: share of each trajectory held out, in (0, 1).

    Returns:
      (train_index, held_out_index): sorted int arrays partitioning 0..T-1.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction: must be in (0, 1); got {held_out_fraction!r}")
    agent_id = np.asarray(transitions.agent_id)
    counts = np.bincount(agent_id, minlength=transitions.num_agents)              # (N,)
    held = np.clip(np.round(held_out_fraction * counts), 1, np.maximum(counts - 1, 0))
    # Position of each transition within its agent (0 = first), without a
    # loop over agents: a stable sort by agent keeps the time order.
    order = np.argsort(agent_id, kind="stable")
    starts = np.cumsum(counts) - counts
    position = np.empty_like(agent_id)
    position[order] = np.arange(agent_id.size) - starts[agent_id[order]]
    is_held = position >= (counts - held)[agent_id]
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)


# ---------------------------------------------------------------------------
# Construction and validation


def make_transitions(
    obs,
    action,
    next_obs,
    agent_id,
    *,
    reward=None,
    done=None,
    timeout=None,
    num_agents: int | None = None,
    num_actions: int | None = None,
    covariates=None,
    agent_keys: Sequence | None = None,
    map_agent_ids: bool = False,
    state_names: Sequence[str] | None = None,
    covariate_names: Sequence[str] | None = None,
) -> Transitions:
    """Builds validated `Transitions` from host arrays.

    Args:
      obs: (T, D) states.
      action: (T,) integer actions in 0..num_actions-1, or (T, A) continuous
        actions. A 1-d integer array is discrete; a 2-d float array is
        continuous (pass (T, 1) for a one-dimensional continuous action).
      next_obs: (T, D) next states.
      agent_id: (T,) agent ids: integers 0..N-1 where every agent has at least
        one transition, or (with `map_agent_ids=True`) any ids, which are
        mapped to 0..N-1 in sorted order and kept in `agent_keys`.
      reward: (T,) rewards; zeros if None.
      done: (T,) terminal flags; False if None.
      timeout: (T,) time-cap flags; False if None.
      num_agents: N; inferred as max(agent_id) + 1 if None.
      num_actions: number of discrete actions; inferred as max(action) + 1 if
        None and actions are discrete.
      covariates: optional (N, P) per-agent parameters.
      agent_keys: original ids of agents 0..N-1, if the caller already mapped
        them.
      map_agent_ids: map arbitrary ids to 0..N-1 instead of rejecting them.
      state_names: optional D names of the state dimensions.
      covariate_names: optional P names of the covariates.

    Returns:
      Transitions with float32 observations and rewards, int32 ids.

    Raises:
      ValueError: naming the field and the first bad row (see
        `validate_transitions`).
    """
    obs = _as_float_array("obs", obs)
    next_obs = _as_float_array("next_obs", next_obs)
    t = obs.shape[0] if obs.ndim >= 1 else 0
    action, discrete, num_actions = _coerce_actions(action, num_actions)
    agent_id, num_agents, agent_keys = _coerce_agent_ids(
        agent_id, t, num_agents=num_agents, agent_keys=agent_keys, map_agent_ids=map_agent_ids)
    reward = np.zeros(t, np.float32) if reward is None else _as_float_array("reward", reward)
    done = np.zeros(t, bool) if done is None else _as_flag_array("done", done)
    timeout = np.zeros(t, bool) if timeout is None else _as_flag_array("timeout", timeout)
    if covariates is not None:
        covariates = _as_float_array("covariates", covariates)

    transitions = Transitions(
        obs=obs, action=action, next_obs=next_obs, reward=reward, done=done,
        timeout=timeout, agent_id=agent_id, covariates=covariates,
        num_agents=int(num_agents), num_actions=num_actions, agent_keys=agent_keys,
        state_names=None if state_names is None else tuple(str(n) for n in state_names),
        covariate_names=(None if covariate_names is None
                         else tuple(str(n) for n in covariate_names)))
    validate_transitions(transitions)
    return transitions.replace(
        action=action.astype(np.int32) if discrete else action,
        agent_id=agent_id.astype(np.int32))


def _coerce_actions(action, num_actions: int | None) -> tuple[np.ndarray, bool, int | None]:
    """Decides whether `action` is discrete and converts it.

    Returns:
      (action, discrete, num_actions): (T,) int64 discrete actions or (T, A)
      float32 continuous ones; num_actions inferred as max(action) + 1 for
      discrete actions when not given, unchanged otherwise.
    """
    action = np.asarray(action)
    if action.ndim == 1 and action.dtype.kind in "iub":
        discrete = True
    elif action.ndim == 1 and action.dtype.kind == "f" and num_actions is not None:
        discrete = True  # integer-valued floats, e.g. from a CSV; checked below
    elif action.ndim == 2 and action.dtype.kind in "iubf":
        discrete = False
    else:
        raise ValueError(
            f"action: expected (T,) integer actions or (T, A) float actions; got shape "
            f"{action.shape} and dtype {action.dtype} (a 1-d continuous action needs shape "
            f"(T, 1); integer-valued floats need num_actions=...)")
    if not discrete:
        return _as_float_array("action", action), False, num_actions
    if action.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(action) | (action != np.round(action)))
        if bad.size:
            raise ValueError(f"action: discrete actions must be integers; row {bad[0]} "
                             f"has {plain(action[bad[0]])}")
    action = action.astype(np.int64)
    if num_actions is None:
        num_actions = int(action.max()) + 1 if action.size else 0
    return action, True, num_actions


def _coerce_agent_ids(agent_id, t: int, *, num_agents: int | None, agent_keys: Sequence | None,
                      map_agent_ids: bool) -> tuple[np.ndarray, int, tuple | None]:
    """Turns (T,) agent ids into agent indices.

    With `map_agent_ids`, any ids are mapped to 0..N-1 in sorted order and the
    originals become `agent_keys`; otherwise the ids must already be integers.
    `t` (the number of transitions) only appears in the shape error.

    Returns:
      (agent_id, num_agents, agent_keys): (T,) int64 indices, N (given, or
      inferred as max + 1 / the number of distinct ids), and the original ids
      as a tuple (None when there are none).
    """
    agent_id = np.asarray(agent_id)
    if agent_id.ndim != 1:
        raise ValueError(f"agent_id: expected shape (T,) = ({t},); got {agent_id.shape}")
    if map_agent_ids:
        if agent_keys is not None:
            raise ValueError("agent_keys: give either agent_keys or map_agent_ids=True, not both")
        keys, agent_id = np.unique(agent_id, return_inverse=True)
        agent_keys = tuple(k.item() if hasattr(k, "item") else k for k in keys)
        if num_agents is not None and num_agents != len(agent_keys):
            raise ValueError(f"num_agents: {num_agents} given but the data has "
                             f"{len(agent_keys)} distinct agent ids")
        num_agents = len(agent_keys)
        logger.info("mapped %d agent ids to 0..%d: %s", num_agents, num_agents - 1,
                    preview(agent_keys))
    else:
        if agent_id.size and agent_id.dtype.kind not in "iu":
            as_float = np.asarray(agent_id, dtype=np.float64) if agent_id.dtype.kind == "f" else None
            if as_float is None or np.any(as_float != np.round(as_float)):
                raise ValueError(
                    f"agent_id: ids must be integers 0..N-1 (dtype {agent_id.dtype}); pass "
                    f"map_agent_ids=True to map arbitrary ids to 0..N-1")
        agent_id = agent_id.astype(np.int64)
        if num_agents is None:
            num_agents = int(agent_id.max()) + 1 if agent_id.size else 0
    return agent_id, num_agents, (None if agent_keys is None else tuple(agent_keys))


def validate_transitions(transitions: Transitions) -> None:
    """Checks a dataset at the edge of the library.

    Raises:
      ValueError naming the field and the first offending row for: wrong
      number of dimensions, mismatched lengths or state sizes, NaN/inf values,
      agent ids outside 0..N-1, agents without transitions, discrete actions
      outside 0..num_actions-1, covariates of the wrong shape.
    """
    _check_arrays(transitions)
    _check_agents(transitions)


def _check_arrays(transitions: Transitions) -> None:
    """Checks the per-transition arrays: shapes (T, D) / (T,), actions, finiteness."""
    obs = np.asarray(transitions.obs)
    next_obs = np.asarray(transitions.next_obs)
    if obs.ndim != 2:
        raise ValueError(f"obs: expected shape (T, D); got {obs.shape}")
    t, d = obs.shape
    if t == 0:
        raise ValueError("obs: the dataset has no transitions")
    if d == 0:
        raise ValueError("obs: states have no dimensions (D = 0)")
    if next_obs.shape != (t, d):
        raise ValueError(f"next_obs: expected shape (T, D) = ({t}, {d}) like obs; got "
                         f"{next_obs.shape}")
    for name, value, shape in (("reward", transitions.reward, (t,)),
                               ("done", transitions.done, (t,)),
                               ("timeout", transitions.timeout, (t,)),
                               ("agent_id", transitions.agent_id, (t,))):
        if np.shape(value) != shape:
            raise ValueError(f"{name}: expected shape {shape} (one per transition); got "
                             f"{np.shape(value)}")
    _check_actions(transitions, t)
    _check_finite("obs", obs)
    _check_finite("next_obs", next_obs)
    _check_finite("reward", np.asarray(transitions.reward))


def _check_actions(transitions: Transitions, t: int) -> None:
    """Checks the T actions: (T,) in 0..num_actions-1, or (T, A) finite floats."""
    action = np.asarray(transitions.action)
    if transitions.discrete:
        if action.shape != (t,):
            raise ValueError(f"action: discrete actions need shape (T,) = ({t},); got "
                             f"{action.shape}")
        n_act = transitions.num_actions
        if n_act < 1:
            raise ValueError(f"num_actions: must be >= 1; got {n_act}")
        bad = np.flatnonzero((action < 0) | (action >= n_act))
        if bad.size:
            raise ValueError(f"action: row {bad[0]} has action {action[bad[0]]}, outside the "
                             f"discrete range 0..{n_act - 1} (num_actions={n_act})")
    else:
        if action.ndim != 2 or action.shape[0] != t or action.shape[1] == 0:
            raise ValueError(f"action: continuous actions need shape (T, A) with T = {t}; got "
                             f"{action.shape}")
        _check_finite("action", action)


def _check_agents(transitions: Transitions) -> None:
    """Checks the agents: ids in 0..N-1, each with a transition, N keys, (N, P) covariates."""
    agent_id = np.asarray(transitions.agent_id)
    n = transitions.num_agents
    if n < 1:
        raise ValueError(f"num_agents: must be >= 1; got {n}")
    bad = np.flatnonzero((agent_id < 0) | (agent_id >= n))
    if bad.size:
        raise ValueError(
            f"agent_id: row {bad[0]} has id {agent_id[bad[0]]}, outside 0..{n - 1} "
            f"(num_agents={n}); ids must be 0..N-1, or pass map_agent_ids=True to map "
            f"arbitrary ids")
    counts = np.bincount(agent_id, minlength=n)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        label = (f"agent {empty[0]}" if transitions.agent_keys is None else
                 f"agent {empty[0]} (id {plain(transitions.agent_keys[empty[0]])!r})")
        raise ValueError(
            f"agent_id: {label} has no transitions ({empty.size} agents without any: "
            f"{preview(empty.tolist())}); every agent 0..N-1 needs at least one (if the ids "
            f"are arbitrary labels, pass map_agent_ids=True)")
    if transitions.agent_keys is not None and len(transitions.agent_keys) != n:
        raise ValueError(f"agent_keys: expected {n} keys (one per agent); got "
                         f"{len(transitions.agent_keys)}")
    if transitions.covariates is not None:
        cov = np.asarray(transitions.covariates)
        if cov.ndim != 2 or cov.shape[0] != n:
            raise ValueError(f"covariates: expected shape (N, P) with N = {n}; got {cov.shape}")
        _check_finite("covariates", cov)
        names = transitions.covariate_names
        if names is not None and len(names) != cov.shape[1]:
            raise ValueError(f"covariate_names: {len(names)} names {list(names)} for "
                             f"{cov.shape[1]} covariates")
    names = transitions.state_names
    if names is not None and len(names) != np.shape(transitions.obs)[1]:
        raise ValueError(f"state_names: {len(names)} names {list(names)} for "
                         f"{np.shape(transitions.obs)[1]} state dimensions")


def from_rollouts(obs, action, next_obs, *, reward=None, done=None, timeout=None, valid=None,
                  num_actions: int | None = None, covariates=None) -> Transitions:
    """Flattens per-agent rollouts (agent n = row n) into Transitions.

    This is the shape a vmapped `lax.scan` of an environment produces.

    Args:
      obs: (N, T, D) states.
      action: (N, T) integer or (N, T, A) float actions.
      next_obs: (N, T, D) true next states (for an auto-resetting env, the
        `final_observation`, not the reset state).
      reward, done, timeout: optional (N, T).
      valid: optional (N, T) bool; steps where it is False (e.g. after the
        agent's single episode ended) are dropped.
      num_actions: number of discrete actions.
      covariates: optional (N, P).

    Returns:
      Transitions ordered by agent, then time.
    """
    obs = np.asarray(obs)
    if obs.ndim != 3:
        raise ValueError(f"obs: expected shape (N, T, D); got {obs.shape}")
    n, t = obs.shape[:2]
    keep = np.ones((n, t), bool) if valid is None else np.asarray(valid, bool)
    if keep.shape != (n, t):
        raise ValueError(f"valid: expected shape (N, T) = ({n}, {t}); got {keep.shape}")
    flat = lambda x: None if x is None else np.asarray(x)[keep]
    agent_id = np.broadcast_to(np.arange(n)[:, None], (n, t))[keep]
    return make_transitions(flat(obs), flat(action), flat(next_obs), agent_id,
                            reward=flat(reward), done=flat(done), timeout=flat(timeout),
                            num_agents=n, num_actions=num_actions, covariates=covariates)


# ---------------------------------------------------------------------------
# Helpers


def _as_float_array(name: str, value) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "iubf":
        raise ValueError(f"{name}: expected numbers; got dtype {array.dtype}")
    if array.dtype.kind == "f" and array.dtype.itemsize > 4:
        # Named here, before float32 turns it into inf (with numpy's warning).
        with np.errstate(invalid="ignore"):
            bad = np.argwhere(np.abs(array) > FLOAT32_MAX)
        if bad.size:
            where = f"row {bad[0][0]}" + (f", column {bad[0][1]}" if array.ndim > 1 else "")
            raise ValueError(f"{name}: {where} is {array[tuple(bad[0])]:g}, beyond float32's "
                             f"range (±{FLOAT32_MAX:.3g}) that the model computes in")
    return array.astype(np.float32)


def _as_flag_array(name: str, value) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind == "f":
        _check_finite(name, array)
    return array.astype(bool)


def _check_finite(name: str, array: np.ndarray) -> None:
    bad = np.argwhere(~np.isfinite(array))
    if bad.size:
        row = bad[0][0]
        where = f"row {row}" + (f", column {bad[0][1]}" if array.ndim > 1 else "")
        raise ValueError(f"{name}: {where} is {array[tuple(bad[0])]} (NaN or inf); all values "
                         f"must be finite")
