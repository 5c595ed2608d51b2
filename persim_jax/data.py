"""Offline transitions of many agents: the container, its validation, and I/O.

PerSim learns from one logged trajectory per agent. Everything the model needs
is a flat table of transitions `(obs, action, next_obs, agent_id)`; rewards and
done flags travel with it for the planner and the reports, and per-agent
covariates (the hidden physics: gravity, pole length, ...) only for evaluation
and plots, never for training.

Formats:
  * `.npz` with D4RL-style keys (`observations`, `actions`,
    `next_observations`, `rewards`, `terminals`, `timeouts`) plus `agent_ids`:
    `save_npz` / `load_npz`.
  * CSV / Parquet in long format, one row per agent and time step (agent id,
    time, state columns, action columns, optionally reward, done and explicit
    next-state columns): `load_csv` / `load_parquet`, `save_csv`.

Every loader validates at the edge (`validate_transitions`) and raises
`ValueError` naming the field and the row. Files are written atomically: to a
temporary file in the destination folder, then renamed over the final name, so
an interrupted save never leaves a half-written dataset behind.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import tempfile
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import jax
import numpy as np
from flax import struct

logger = logging.getLogger(__name__)

NPZ_FORMAT = "persim-jax-transitions"


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
                             f"has {_plain(action[bad[0]])}")
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
                    _preview(agent_keys))
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
                 f"agent {empty[0]} (id {_plain(transitions.agent_keys[empty[0]])!r})")
        raise ValueError(
            f"agent_id: {label} has no transitions ({empty.size} agents without any: "
            f"{_preview(empty.tolist())}); every agent 0..N-1 needs at least one (if the ids "
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
# Atomic writes


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Opens a temporary file next to `path`; renames it to `path` on success.

    If the body raises (or the process dies), `path` is untouched: it keeps its
    previous content or stays absent, and the temporary file is removed.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        newline = {} if "b" in mode else {"newline": ""}
        with os.fdopen(fd, mode, **newline) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp makes the file private (0600); the result gets the mode any
        # new file would get (0666 less the umask), before it becomes visible.
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def save_msgpack(path: str | os.PathLike, payload: dict) -> None:
    """Writes `payload` (a dict of arrays, numbers, strings, lists; with a
    "format" entry naming the file's kind) as one msgpack file, atomically."""
    from flax import serialization

    with atomic_write(path) as handle:
        handle.write(serialization.msgpack_serialize(payload))


def load_msgpack(path: str | os.PathLike, file_format: str, what: str) -> dict:
    """The payload of a `save_msgpack` file whose "format" is `file_format`;
    ValueError "<path>: not <what>" for any other file."""
    from flax import serialization

    with open(path, "rb") as handle:
        try:
            payload = serialization.msgpack_restore(handle.read())
        except Exception:       # msgpack raises several types for foreign bytes
            payload = None
    if not isinstance(payload, dict) or payload.get("format") != file_format:
        raise ValueError(f"{os.fspath(path)}: not {what}")
    return payload


def _current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


# ---------------------------------------------------------------------------
# .npz (D4RL-style keys)


def save_npz(path: str | os.PathLike, transitions: Transitions) -> None:
    """Writes `transitions` to `path` atomically, with D4RL-style keys.

    Keys: `observations` (T, D), `actions` (T,) or (T, A), `next_observations`,
    `rewards`, `terminals`, `timeouts`, `agent_ids`, and our metadata:
    `num_agents`, `num_actions` (-1 for continuous), `covariates` (if any),
    `agent_keys` (JSON, if any), `format`.
    """
    validate_transitions(transitions)
    arrays = {
        "observations": np.asarray(transitions.obs),
        "actions": np.asarray(transitions.action),
        "next_observations": np.asarray(transitions.next_obs),
        "rewards": np.asarray(transitions.reward),
        "terminals": np.asarray(transitions.done),
        "timeouts": np.asarray(transitions.timeout),
        "agent_ids": np.asarray(transitions.agent_id),
        "num_agents": np.asarray(transitions.num_agents),
        "num_actions": np.asarray(-1 if transitions.num_actions is None else transitions.num_actions),
        "format": np.asarray(NPZ_FORMAT),
    }
    if transitions.covariates is not None:
        arrays["covariates"] = np.asarray(transitions.covariates)
    if transitions.agent_keys is not None:
        arrays["agent_keys"] = np.asarray(json.dumps(list(transitions.agent_keys)))
    for key in ("state_names", "covariate_names"):
        if getattr(transitions, key) is not None:
            arrays[key] = np.asarray(json.dumps(list(getattr(transitions, key))))
    with atomic_write(path) as handle:
        np.savez(handle, **arrays)


def load_npz(path: str | os.PathLike, *, num_actions: int | None = None,
             map_agent_ids: bool = False, allow_outliers: bool = False) -> Transitions:
    """Reads and validates a dataset written by `save_npz` or a D4RL-style file.

    Required keys: `observations`, `actions`, `next_observations`, `agent_ids`.
    Optional: `rewards`, `terminals`, `timeouts` (zeros), `num_agents`,
    `num_actions`, `covariates`, `agent_keys`, `state_names` and
    `covariate_names` (string arrays, or JSON lists).

    Args:
      path: the `.npz` file.
      num_actions: number of discrete actions, overriding the file's.
      map_agent_ids: map arbitrary ids to 0..N-1 (kept in `agent_keys`).
      allow_outliers: accept values far outside their column's own scale
        (`check_column_values`).

    Raises:
      ValueError: a missing key, a value outside its column's scale, or any
        check of `validate_transitions`.
    """
    with np.load(path, allow_pickle=False) as file:
        contents = {key: file[key] for key in file.files}
    missing = [k for k in ("observations", "actions", "next_observations", "agent_ids")
               if k not in contents]
    if missing:
        raise ValueError(f"{os.fspath(path)}: missing key(s) {missing}; found {sorted(contents)}")
    for key in ("observations", "next_observations", "actions", "rewards", "covariates"):
        if key in contents and (key != "actions" or contents[key].ndim == 2):
            _check_array_values(key, contents[key], allow_outliers)
    names = {key: _names_of(contents[key]) if key in contents else None
             for key in ("state_names", "covariate_names")}
    if num_actions is None and "num_actions" in contents and int(contents["num_actions"]) >= 0:
        num_actions = int(contents["num_actions"])
    agent_keys = None
    if "agent_keys" in contents and not map_agent_ids:
        agent_keys = json.loads(str(contents["agent_keys"]))
    return make_transitions(
        contents["observations"], contents["actions"], contents["next_observations"],
        contents["agent_ids"], reward=contents.get("rewards"), done=contents.get("terminals"),
        timeout=contents.get("timeouts"),
        num_agents=(int(contents["num_agents"]) if "num_agents" in contents and not map_agent_ids
                    else None),
        num_actions=num_actions, covariates=contents.get("covariates"),
        agent_keys=agent_keys, map_agent_ids=map_agent_ids, **names)


def _names_of(array: np.ndarray) -> list[str]:
    """Names stored in an .npz: a string array, or one JSON list."""
    if array.ndim == 0:
        return [str(x) for x in json.loads(str(array))]
    return [str(x) for x in array.tolist()]


# ---------------------------------------------------------------------------
# Long format (CSV, Parquet)


def load_csv(path: str | os.PathLike, **options) -> Transitions:
    """Reads a long-format CSV file: one row per agent and time step.

    Parsed with the standard library (no pandas). The first line is the
    header. See `from_long_format` for the columns and options.

    Raises:
      ValueError: naming the column and the file line for unparsable or
        non-finite values, and every check of `from_long_format`.
    """
    path = os.fspath(path)
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = [name.strip() for name in next(reader)]
        except StopIteration:
            raise ValueError(f"{path}: the file is empty (no header line)") from None
        rows = []
        for line_number, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}: line {line_number} has {len(row)} fields; the header "
                                 f"has {len(header)}")
            rows.append((line_number, row))
    lines = np.array([line for line, _ in rows], dtype=np.int64)
    columns = {name: [row[j] for _, row in rows] for j, name in enumerate(header)}
    return from_long_format(columns, row_labels=lines, source=f"{path}: line", **options)


def load_parquet(path: str | os.PathLike, **options) -> Transitions:
    """Reads a long-format Parquet file (needs `pyarrow`).

    Same columns and options as `load_csv` (see `from_long_format`); errors
    name the column and the 0-based table row.
    """
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ImportError("load_parquet needs pyarrow: pip install pyarrow") from error
    table = pq.read_table(os.fspath(path))
    columns = {name: table.column(name).to_numpy(zero_copy_only=False)
               for name in table.column_names}
    return from_long_format(columns, source=f"{os.fspath(path)}: row", **options)


def from_long_format(
    columns: Mapping[str, Sequence],
    *,
    agent_column: str = "agent_id",
    time_column: str | None = "time",
    state_columns: Sequence[str] | None = None,
    action_columns: Sequence[str] | None = None,
    next_state_columns: Sequence[str] | None = None,
    reward_column: str | None = "reward",
    done_column: str | None = "done",
    state_prefix: str = "obs_",
    action_prefix: str = "action",
    next_state_prefix: str = "next_obs_",
    covariate_columns: Sequence[str] | None = None,
    covariate_prefix: str | None = "cov_",
    discrete_actions: bool | None = None,
    num_actions: int | None = None,
    map_agent_ids: bool = False,
    covariates=None,
    allow_outliers: bool = False,
    row_labels: np.ndarray | None = None,
    source: str = "row",
) -> Transitions:
    """Builds Transitions from a long-format table (column name -> values).

    Layout: one row per agent and time step with the agent id, the time step,
    the state s_t (columns `state_columns`, by default every column whose name
    starts with `state_prefix`, in table order), the action a_t taken at that
    step (`action_columns`, by default the columns starting with
    `action_prefix`), optionally the reward r_t and done flag of that step,
    and optionally the agent's covariates (`covariate_columns`, by default
    the columns starting with `covariate_prefix`): one value per agent,
    repeated on each of its rows, read into `Transitions.covariates` (N, P)
    with the column names in `covariate_names`.

    Next states: if the table has next-state columns (`next_state_columns`, or
    columns starting with `next_state_prefix`), every row is a transition.
    Otherwise the next state of a row is the state of the same agent's next
    row in time order, so each agent's last row is dropped (its outcome was not
    logged), and so is any row flagged done that has a later row (the later row
    is a reset, not the outcome). An agent with a single row therefore has no
    transition and is rejected.

    Args:
      columns: column name -> (R,) values (strings or numbers).
      agent_column: the agent id column (any ids with `map_agent_ids=True`,
        else integers 0..N-1).
      time_column: the time-step column; rows are sorted by it within each
        agent and duplicates are rejected. None: rows are in time order as
        given.
      state_columns, action_columns, next_state_columns, covariate_columns:
        explicit column names; None infers them by prefix (no covariates
        when `covariate_prefix` is None).
      reward_column, done_column: used when present in the table; None
        ignores them.
      discrete_actions: whether actions are discrete; None infers True when
        there is one action column whose values are all integers.
      num_actions: number of discrete actions (default: max action + 1).
      map_agent_ids: map arbitrary agent ids to 0..N-1, in sorted order; the
        original ids are kept in `Transitions.agent_keys`.
      covariates: optional (N, P) per-agent parameters, in agent index order
        (instead of covariate columns).
      allow_outliers: accept values more than `OUTLIER_FACTOR` times their
        column's typical magnitude (`check_column_values`); by default they
        are errors naming the row and column.
      row_labels: (R,) what to call each row in error messages (e.g. the
        file's line numbers); defaults to the 0-based row index.
      source: prefix of row references in error messages.

    Returns:
      Validated Transitions, with `state_names` (the state columns) and
      `covariate_names` (the covariate columns, if any).
    """
    table = _LongTable.of(columns, row_labels, source)
    if table.num_rows == 0:
        raise ValueError(f"{source.split(':')[0]}: the table has no rows")
    roles = _resolve_columns(
        table, agent_column=agent_column, time_column=time_column,
        state_columns=state_columns, action_columns=action_columns,
        next_state_columns=next_state_columns, reward_column=reward_column,
        done_column=done_column, state_prefix=state_prefix, action_prefix=action_prefix,
        next_state_prefix=next_state_prefix,
        covariate_columns=[] if covariates is not None else covariate_columns,
        covariate_prefix=None if covariates is not None else covariate_prefix)
    for name in [*roles.state, *roles.action, *roles.next_state, *roles.covariates,
                 *([roles.reward] if roles.reward is not None else [])]:
        check_column_values(name, table.numeric(name), table.where,
                            allow_outliers=allow_outliers)
    raw_ids, ids, agent_keys = _agent_indices(table, roles.agent, map_agent_ids)
    order, same_agent = _sort_by_agent_and_time(table, roles.time, ids, raw_ids)
    state = np.stack([table.numeric(name) for name in roles.state], axis=1)
    action, discrete_actions = _parse_actions(table, roles.action, discrete_actions, num_actions)
    reward = (table.numeric(roles.reward) if roles.reward is not None
              else np.zeros(table.num_rows))
    done = (_parse_flags(table, roles.done) if roles.done is not None
            else np.zeros(table.num_rows, bool))
    rows, next_state = _pair_successors(table, roles.next_state, state, done, order, same_agent)
    num_agents = int(ids.max()) + 1 if agent_keys is None else len(agent_keys)
    _check_every_agent_has_a_transition(table, roles.agent, ids, rows, num_agents, agent_keys)
    if roles.covariates:
        covariates = _per_agent_values(table, roles.covariates, ids, raw_ids, num_agents,
                                       roles.agent)
    return make_transitions(
        state[rows], action[rows], next_state, ids[rows], reward=reward[rows], done=done[rows],
        num_agents=num_agents, num_actions=num_actions if discrete_actions else None,
        covariates=covariates, agent_keys=agent_keys, state_names=roles.state,
        covariate_names=roles.covariates or None)


class _LongTable(NamedTuple):
    """A long-format table (column name -> (R,) values) and how errors name its rows."""

    columns: Mapping[str, Sequence]
    labels: np.ndarray  # (R,) what to call each row in messages, e.g. file line numbers
    source: str  # prefix of row references, e.g. "data.csv: line"
    parsed: dict  # column name -> its (R,) float64 values, parsed once

    @classmethod
    def of(cls, columns: Mapping[str, Sequence], row_labels: np.ndarray | None,
           source: str) -> "_LongTable":
        num_rows = len(next(iter(columns.values()))) if columns else 0
        labels = np.arange(num_rows) if row_labels is None else np.asarray(row_labels)
        return cls(columns, labels, source, {})

    @property
    def names(self) -> list[str]:
        return list(self.columns)

    @property
    def num_rows(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def where(self, row: int) -> str:
        """How messages refer to table row `row`, e.g. "data.csv: line 7"."""
        return f"{self.source} {self.labels[row]}"

    def require(self, name: str, role: str) -> None:
        """Raises a ValueError naming `role` and listing the columns if `name` is absent."""
        if name not in self.columns:
            raise ValueError(f"{role}: column {name!r} not found; columns are {self.names}")

    def numeric(self, name: str) -> np.ndarray:
        """(R,) float64 values of column `name`; rejects text, blanks, NaN and inf."""
        if name not in self.parsed:
            self.parsed[name] = self._parse_numbers(name)
        return self.parsed[name]

    def _parse_numbers(self, name: str) -> np.ndarray:
        values = self.columns[name]
        try:
            out = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            # Parse value by value to name the first row that is not a number.
            out = np.empty(len(values), np.float64)
            for i, value in enumerate(values):
                try:
                    out[i] = float(value) if value is not None and str(value).strip() else np.nan
                except ValueError:
                    raise ValueError(f"column {name!r}: {self.where(i)} has {_plain(value)!r}, "
                                     f"not a number") from None
        bad = np.flatnonzero(~np.isfinite(out))
        if bad.size:
            raise ValueError(f"column {name!r}: {self.where(bad[0])} has "
                             f"{_plain(values[bad[0]])!r} (missing, NaN or inf)")
        return out


class _ColumnRoles(NamedTuple):
    """Which columns of a long-format table hold what."""

    agent: str
    time: str | None  # None: rows are in time order; checked when the rows are sorted
    state: Sequence[str]  # D columns of s_t
    action: Sequence[str]  # one discrete or A continuous action columns
    next_state: Sequence[str]  # D columns of s_{t+1}, or empty: the agent's next row is s_{t+1}
    reward: str | None  # None: absent from the table, rewards are zero
    done: str | None  # None: absent from the table, no step is done
    covariates: Sequence[str]  # P columns constant within an agent, or empty


def _resolve_columns(table: _LongTable, *, agent_column: str, time_column: str | None,
                     state_columns: Sequence[str] | None, action_columns: Sequence[str] | None,
                     next_state_columns: Sequence[str] | None, reward_column: str | None,
                     done_column: str | None, state_prefix: str, action_prefix: str,
                     next_state_prefix: str, covariate_columns: Sequence[str] | None,
                     covariate_prefix: str | None) -> _ColumnRoles:
    """Finds the agent, state, action, next-state, reward, done and covariate columns.

    Columns not given are inferred by name prefix, in table order; a column
    claimed by an earlier role is not taken again. Raises a ValueError naming
    the role and listing the table's columns when one is missing.
    """
    names = table.names

    def by_prefix(prefix: str, exclude: Sequence[str]) -> list[str]:
        return [n for n in names if n.startswith(prefix) and n not in exclude]

    table.require(agent_column, "agent_column")
    special = [agent_column, time_column, reward_column, done_column]
    if covariate_columns is None:
        covariate_columns = by_prefix(covariate_prefix, special) if covariate_prefix else []
    for name in covariate_columns:
        table.require(name, "covariate_columns")
    special = [*special, *covariate_columns]
    if next_state_columns is None:
        next_state_columns = by_prefix(next_state_prefix, special)
    for name in next_state_columns:
        table.require(name, "next_state_columns")
    if state_columns is None:
        state_columns = by_prefix(state_prefix, [*special, *next_state_columns])
        if not state_columns:
            raise ValueError(f"state_columns: no column starts with {state_prefix!r}; pass "
                             f"state_columns=[...] or state_prefix=...; columns are {names}")
    if action_columns is None:
        action_columns = by_prefix(action_prefix, [*special, *state_columns, *next_state_columns])
        if not action_columns:
            raise ValueError(f"action_columns: no column starts with {action_prefix!r}; pass "
                             f"action_columns=[...] or action_prefix=...; columns are {names}")
    for name in state_columns:
        table.require(name, "state_columns")
    for name in action_columns:
        table.require(name, "action_columns")
    if next_state_columns and len(next_state_columns) != len(state_columns):
        raise ValueError(f"next_state_columns: {len(next_state_columns)} columns "
                         f"{list(next_state_columns)} for {len(state_columns)} state columns "
                         f"{list(state_columns)}")
    present = lambda name: name if name is not None and name in table.columns else None
    return _ColumnRoles(agent=agent_column, time=time_column, state=list(state_columns),
                        action=list(action_columns), next_state=list(next_state_columns),
                        reward=present(reward_column), done=present(done_column),
                        covariates=list(covariate_columns))


def _per_agent_values(table: _LongTable, names: Sequence[str], ids: np.ndarray,
                      raw_ids: np.ndarray, num_agents: int, agent_column: str) -> np.ndarray:
    """(N, P) values of the P covariate columns `names`, one per agent: each
    must be the same on every row of an agent (a ValueError names the column,
    the agent and the two rows that differ). `ids`: (R,) agent index of each
    row; `raw_ids`: (R,) the ids as in the file."""
    out = np.empty((num_agents, len(names)), np.float64)
    first_row = np.full(num_agents, -1)
    # Reversed assignment: the last write, the agent's first row, wins.
    first_row[ids[::-1]] = np.arange(len(ids))[::-1]
    for j, name in enumerate(names):
        values = table.numeric(name)
        first = values[first_row]                                       # (N,)
        differs = np.flatnonzero(values != first[ids])
        if differs.size:
            row = differs[0]
            agent = ids[row]
            raise ValueError(
                f"column {name!r}: agent {_plain(raw_ids[row])!r} has {values[first_row[agent]]:g} "
                f"at {table.where(first_row[agent])} but {values[row]:g} at {table.where(row)}; "
                f"a covariate column (named by the covariate prefix, or covariate_columns) "
                f"holds one value per agent, the same on each of its rows (a quantity that "
                f"changes over time is a state: rename the column, or change the prefix)")
        out[:, j] = first
    return out


def _agent_indices(table: _LongTable, agent_column: str,
                   map_agent_ids: bool) -> tuple[np.ndarray, np.ndarray, tuple | None]:
    """Reads the agent id column and turns it into agent indices.

    Returns:
      (raw_ids, ids, agent_keys): the (R,) ids as read (integers when every id
      is one), the (R,) agent indices (the ids themselves, or with
      `map_agent_ids` their rank among the distinct ids), and the original id
      of each agent 0..N-1 (None without `map_agent_ids`).
    """
    where = table.where
    raw_ids = np.asarray(table.columns[agent_column])
    if raw_ids.dtype.kind in "OSU":
        missing = [i for i, v in enumerate(raw_ids) if v is None or not str(v).strip()]
        if missing:
            raise ValueError(f"column {agent_column!r}: {where(missing[0])} has no agent id")
        raw_ids = np.asarray([str(v).strip() for v in raw_ids])
        if all(_is_int(v) for v in raw_ids):
            # Integer ids read as text (CSV): compare them as numbers.
            raw_ids = np.asarray([int(v) for v in raw_ids], dtype=np.int64)
        elif not map_agent_ids:
            bad = next(i for i, v in enumerate(raw_ids) if not _is_int(v))
            raise ValueError(
                f"column {agent_column!r}: {where(bad)} has id {_plain(raw_ids[bad])!r}; ids must "
                f"be integers 0..N-1, or pass map_agent_ids=True to map arbitrary ids to "
                f"0..N-1")
    elif not map_agent_ids:
        values = table.numeric(agent_column)
        bad = np.flatnonzero(values != np.round(values))
        if bad.size:
            raise ValueError(f"column {agent_column!r}: {where(bad[0])} has id {values[bad[0]]:g}; "
                             f"ids must be integers 0..N-1, or pass map_agent_ids=True")
        raw_ids = values.astype(np.int64)
    if map_agent_ids:
        keys, ids = np.unique(raw_ids, return_inverse=True)
        agent_keys = tuple(k.item() if hasattr(k, "item") else k for k in keys)
        logger.info("mapped %d agent ids to 0..%d: %s", len(keys), len(keys) - 1,
                    _preview(agent_keys))
        return raw_ids, ids, agent_keys
    bad = np.flatnonzero(raw_ids < 0)
    if bad.size:
        raise ValueError(f"column {agent_column!r}: {where(bad[0])} has id {raw_ids[bad[0]]}; ids "
                         f"must be 0..N-1, or pass map_agent_ids=True")
    return raw_ids, raw_ids, None


def _sort_by_agent_and_time(table: _LongTable, time_column: str | None, ids: np.ndarray,
                            raw_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orders the R rows by agent, then time (file order without a time column).

    Returns:
      (order, same_agent): (R,) row indices in that order, and (R-1,) bool,
      whether sorted rows i and i+1 belong to the same agent.
    """
    if time_column is not None:
        table.require(time_column, "time_column (pass time_column=None if rows are in time order)")
        time = table.numeric(time_column)
    else:
        time = np.arange(table.num_rows, dtype=np.float64)
    # Stable sort: by agent, then time; a duplicated time step is ambiguous.
    order = np.lexsort((time, ids))
    same_agent = ids[order][1:] == ids[order][:-1]
    duplicated = np.flatnonzero(same_agent & (time[order][1:] == time[order][:-1]))
    if time_column is not None and duplicated.size:
        a, b = order[duplicated[0]], order[duplicated[0] + 1]
        raise ValueError(f"column {time_column!r}: {table.where(a)} and {table.where(b)} both "
                         f"give agent {_plain(raw_ids[a])!r} time step {time[a]:g}")
    return order, same_agent


def _parse_actions(table: _LongTable, action_columns: Sequence[str],
                   discrete_actions: bool | None,
                   num_actions: int | None) -> tuple[np.ndarray, bool]:
    """Reads the action columns.

    Returns:
      (action, discrete): (R,) int64 discrete actions or (R, A) float32
      continuous ones, and whether they are discrete (inferred when
      `discrete_actions` is None: one column of integer values).
    """
    action_values = np.stack([table.numeric(n) for n in action_columns], axis=1)
    if discrete_actions is None:
        discrete_actions = (len(action_columns) == 1
                            and bool(np.all(action_values == np.round(action_values))))
    if not discrete_actions:
        return action_values.astype(np.float32), discrete_actions
    if len(action_columns) != 1:
        raise ValueError(f"action_columns: discrete actions need one column; got "
                         f"{list(action_columns)}")
    column = action_values[:, 0]
    bad = np.flatnonzero(column != np.round(column))
    if bad.size:
        raise ValueError(f"column {action_columns[0]!r}: {table.where(bad[0])} has "
                         f"{column[bad[0]]:g}, not an integer action (continuous actions: "
                         f"discrete_actions=False, or leave it out to infer it)")
    if num_actions is not None:
        bad = np.flatnonzero((column < 0) | (column >= num_actions))
        if bad.size:
            raise ValueError(f"column {action_columns[0]!r}: {table.where(bad[0])} has action "
                             f"{column[bad[0]]:g}, outside 0..{num_actions - 1}")
    return column.astype(np.int64), discrete_actions


def _parse_flags(table: _LongTable, name: str) -> np.ndarray:
    """(R,) bool values of a 0/1 flag column (also true/false, t/f, yes/no; blank is
    False); a ValueError names the row (file line) of any other value."""
    values = table.columns[name]
    out = np.empty(len(values), bool)
    for i, value in enumerate(values):
        text = str(value).strip().lower()
        if text in ("1", "1.0", "true", "t", "yes"):
            out[i] = True
        elif text in ("0", "0.0", "false", "f", "no", ""):
            out[i] = False
        else:
            raise ValueError(f"column {name!r}: {table.where(i)} has {_plain(value)!r}, not a "
                             f"0/1 flag")
    return out


def _pair_successors(table: _LongTable, next_state_columns: Sequence[str], state: np.ndarray,
                     done: np.ndarray, order: np.ndarray,
                     same_agent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Finds each transition's next state.

    With next-state columns every row is a transition. Otherwise a row's next
    state is the state of the same agent's next row (in `order`); an agent's
    last row has no logged successor and is dropped, and so is a done row,
    whose next row is a reset.

    Args:
      state: (R, D) states of all rows.
      done: (R,) done flags of all rows.
      order: (R,) rows sorted by agent, then time.
      same_agent: (R-1,) whether sorted rows i and i+1 belong to the same agent.

    Returns:
      (rows, next_state): (T,) the table rows that are transitions, in agent
      and time order, and their (T, D) next states.
    """
    if next_state_columns:
        next_state = np.stack([table.numeric(n) for n in next_state_columns], axis=1)
        return order, next_state[order]
    pair = same_agent & ~done[order][:-1]
    rows, next_rows = order[:-1][pair], order[1:][pair]
    return rows, state[next_rows]


def _check_every_agent_has_a_transition(table: _LongTable, agent_column: str, ids: np.ndarray,
                                        rows: np.ndarray, num_agents: int,
                                        agent_keys: tuple | None) -> None:
    """Rejects an agent index in 0..num_agents-1 that none of the (T,) transition
    `rows` belongs to, saying whether it has no rows at all (a gap in the ids) or
    rows but no logged successor. `ids`: (R,) agent index of every table row."""
    present = np.bincount(ids[rows], minlength=num_agents)
    empty = np.flatnonzero(present == 0)
    if not empty.size:
        return
    agent = int(empty[0])
    label = agent if agent_keys is None else agent_keys[agent]
    rows_of_agent = np.flatnonzero(ids == agent)
    why = ("it has no rows; ids must be 0..N-1 without gaps, or pass map_agent_ids=True"
           if rows_of_agent.size == 0 else
           f"it has {rows_of_agent.size} row(s) (first: {table.where(rows_of_agent[0])}) and none "
           f"with a logged successor; a transition needs a row and the agent's next row "
           f"(or next-state columns)")
    raise ValueError(f"column {agent_column!r}: agent {_plain(label)!r} has no transitions: "
                     f"{why}")


def save_csv(path: str | os.PathLike, transitions: Transitions) -> None:
    """Writes `transitions` atomically as a long-format CSV with explicit
    next-state columns (`agent_id, time, obs_0.., action.., next_obs_0..,
    reward, done`), which `load_csv` reads back. `time` is the transition's
    index within its agent. Original agent ids (`agent_keys`) are written when
    present."""
    validate_transitions(transitions)
    obs = np.asarray(transitions.obs)
    next_obs = np.asarray(transitions.next_obs)
    action = np.asarray(transitions.action)
    agent_id = np.asarray(transitions.agent_id)
    d = obs.shape[1]
    action_names = (["action"] if transitions.discrete else
                    [f"action_{j}" for j in range(action.shape[1])])
    header = (["agent_id", "time"] + [f"obs_{j}" for j in range(d)] + action_names
              + [f"next_obs_{j}" for j in range(d)] + ["reward", "done"])
    counts = np.zeros(transitions.num_agents, np.int64)
    keys = transitions.agent_keys
    with atomic_write(path, "w") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for i in range(obs.shape[0]):
            n = agent_id[i]
            acts = [int(action[i])] if transitions.discrete else [repr(float(x)) for x in action[i]]
            writer.writerow([n if keys is None else keys[n], counts[n]]
                            + [repr(float(x)) for x in obs[i]] + acts
                            + [repr(float(x)) for x in next_obs[i]]
                            + [repr(float(transitions.reward[i])), int(transitions.done[i])])
            counts[n] += 1


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


# A value more than this many times its column's typical magnitude is taken
# for a data error (a unit slip, a sentinel such as 1e30 or -9.9e37) unless
# the caller accepts it (`allow_outliers=True`).
OUTLIER_FACTOR = 1e6
FLOAT32_MAX = float(np.finfo(np.float32).max)


def column_scale(values) -> float:
    """The typical magnitude of one column: the median of its non-zero
    absolute values (0 when all are zero). Zeros are left out so that a
    mostly-zero column (meal sizes, doses) keeps the scale of its non-zero
    entries; the median ignores a few wild values.

    Args:
      values: (R,) finite numbers.
    """
    magnitude = np.abs(np.asarray(values, np.float64))
    nonzero = magnitude[magnitude > 0]
    return float(np.median(nonzero)) if nonzero.size else 0.0


def check_column_values(name: str, values, where, *, allow_outliers: bool = False) -> None:
    """Rejects a value of one (R,) column that float32 cannot hold, or (unless
    `allow_outliers`) one more than `OUTLIER_FACTOR` times the column's
    typical magnitude (`column_scale`).

    Args:
      name: how messages call the column.
      values: (R,) finite float64 values.
      where: row index -> how messages call that row ("data.csv: line 7").
      allow_outliers: accept values outside the column's scale.

    Raises:
      ValueError naming the column, the row and the value.
    """
    values = np.asarray(values, np.float64)
    magnitude = np.abs(values)
    bad = np.flatnonzero(magnitude > FLOAT32_MAX)
    if bad.size:
        raise ValueError(f"column {name!r}: {where(bad[0])} has {values[bad[0]]:g}, beyond "
                         f"float32's range (±{FLOAT32_MAX:.3g}) that the model computes in")
    if allow_outliers:
        return
    scale = column_scale(values)
    bad = np.flatnonzero(magnitude > OUTLIER_FACTOR * scale)
    if bad.size:
        raise ValueError(
            f"column {name!r}: {where(bad[0])} has {values[bad[0]]:g}, more than "
            f"{OUTLIER_FACTOR:g} times the column's typical magnitude {scale:.4g} (the median "
            f"of its non-zero absolute values; {bad.size} such value(s)); correct it, or "
            f"accept it with allow_outliers=True")


def _check_array_values(name: str, array: np.ndarray, allow_outliers: bool) -> None:
    """`check_column_values` on each column of a (T,) or (T, K) array whose
    rows are the file's rows (messages name "row i, column j")."""
    array = np.asarray(array)
    if array.dtype.kind not in "iuf" or array.size == 0:
        return
    columns = array.reshape(array.shape[0], -1)
    for j in range(columns.shape[1]):
        values = columns[:, j].astype(np.float64)
        if not np.all(np.isfinite(values)):
            continue     # validate_transitions names non-finite values
        label = name if columns.shape[1] == 1 and array.ndim == 1 else f"{name}[:, {j}]"
        check_column_values(label, values, lambda i: f"row {i}",
                            allow_outliers=allow_outliers)


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


def _plain(value):
    """A numpy scalar as the Python value it holds (messages show 0.5 and
    'a', not np.float64(0.5) and np.str_('a'))."""
    return value.item() if isinstance(value, np.generic) else value


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def _preview(items: Sequence, limit: int = 5) -> str:
    items = list(items)
    shown = ", ".join(repr(_plain(x)) for x in items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}]"
