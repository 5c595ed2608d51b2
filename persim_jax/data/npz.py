"""Datasets as `.npz` files with D4RL-style keys (`observations`, `actions`,
`next_observations`, `rewards`, `terminals`, `timeouts`) plus `agent_ids`:
`save_npz` writes them atomically, `load_npz` reads and validates them (ours
or D4RL-style files of others).
"""

from __future__ import annotations

import json
import os

import numpy as np

from persim_jax.data.checks import check_array_values
from persim_jax.data.files import atomic_write
from persim_jax.data.transitions import Transitions, make_transitions, validate_transitions

NPZ_FORMAT = "persim-jax-transitions"


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
            check_array_values(key, contents[key], allow_outliers)
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
