"""Minari datasets on the command line: `--dataset=minari:<id>` of
`experiments.run` (any local Minari dataset, `persim_jax.data.from_minari`)
and `experiments.make_dataset --minari` (the paper's datasets as
`persim/<env>/<dataset>-v0`).

    transitions, metadata = minari_data.load("minari:persim/cartpole/pure-v0", "cartpole", {})
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np

from experiments.config import UserError
from persim_jax import data
from persim_jax.data import minari as minari_io

PREFIX = "minari:"
NAMESPACE = "persim"


def check_available() -> None:
    """UserError (one line) unless minari and its storage are installed."""
    try:
        minari_io.local_dataset_ids()
    except ImportError as error:
        raise UserError(f"--minari: {error}") from None


def is_minari(dataset: str) -> bool:
    """Whether `--dataset` names a Minari dataset (`minari:<id>`)."""
    return dataset.startswith(PREFIX)


def dataset_id(dataset: str) -> str:
    """The Minari id of `minari:<id>`."""
    return dataset[len(PREFIX):]


def run_name(dataset: str) -> str:
    """The run directory's name: `minari_` and the id, its `/` as `_`
    (`minari:persim/cartpole/pure-v0` -> `minari_persim_cartpole_pure-v0`)."""
    return "minari_" + re.sub(r"[^\w.-]", "_", dataset_id(dataset))


def paper_id(env_name: str, dataset: str, seed: int, num_agents: int,
             default_agents: int) -> str:
    """`persim/<env>/<dataset>-v0` for the paper's request (seed 0, its
    agents); `_seed<s>` / `_n<N>` added to the name otherwise, as the `.npz`
    cache's file names do, so that two requests never share an id."""
    name = dataset + (f"_seed{seed}" if seed else "") + (
        f"_n{num_agents}" if num_agents != default_agents else "")
    return f"{NAMESPACE}/{env_name}/{name}-v0"


def transitions_sha256(transitions: data.Transitions) -> str:
    """sha256 of everything the models see of a dataset: the arrays (dtype,
    shape, bytes) and the ids, names and sizes. Minari's files are not
    hashed: the same data in another storage format, or moved, is the same
    dataset."""
    digest = hashlib.sha256()
    for field in ("obs", "action", "next_obs", "reward", "done", "timeout", "agent_id",
                  "covariates"):
        value = getattr(transitions, field)
        array = None if value is None else np.ascontiguousarray(value)
        digest.update(f"{field}:{None if array is None else (array.dtype.str, array.shape)}"
                      .encode())
        if array is not None:
            digest.update(array.tobytes())
    static = [transitions.num_agents, transitions.num_actions, transitions.agent_keys,
              transitions.state_names, transitions.covariate_names]
    digest.update(json.dumps(static, default=repr).encode())
    return digest.hexdigest()


def load(dataset: str, options: dict, defaults: dict) -> tuple[data.Transitions, dict]:
    """(Transitions, metadata) of `minari:<id>`; UserError (one line) names
    a missing extra, an id that is not local, or bad data.

    Args:
      dataset: `minari:<id>`.
      options: the own-data loader options; only `allow_outliers` applies
        (the column flags are for long-format files).
      defaults: the options' defaults, to name the flags given in vain.
    """
    changed = [f"--{k}" for k, v in options.items()
               if k != "allow_outliers" and v != defaults.get(k)]
    if changed:
        raise UserError(f"{', '.join(changed)}: column names apply to .csv / .parquet files, "
                        f"not to a Minari dataset")
    minari_id = dataset_id(dataset)
    try:
        transitions = data.from_minari(minari_id,
                                       allow_outliers=bool(options.get("allow_outliers")))
    except (ImportError, ValueError, OSError, KeyError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        message = message.replace("allow_outliers=True", "--allow_outliers")
        if minari_id not in message:
            message = f"{dataset}: {message}"
        raise UserError(f"--dataset: {message}") from None
    metadata = {"path": dataset, "sha256": transitions_sha256(transitions),
                "num_agents": transitions.num_agents,
                "num_transitions": transitions.num_transitions, "read": True,
                # What the trained models depend on besides the arrays (not
                # the id or folder: a renamed copy retrains nothing).
                "loader": {"format": "minari",
                           "allow_outliers": bool(options.get("allow_outliers")),
                           "held_out": "last 20% per agent"}}
    return transitions, metadata


def paper_description(metadata: dict, default_agents: int) -> str:
    """The Minari description of one of the paper's datasets: how it was
    made and its Table 8 statistics beside the paper's."""
    stats, paper = metadata["stats"], metadata.get("paper")
    lines = [
        f"PerSim's offline {metadata['env']} / {metadata['dataset']} dataset (Agarwal et al., "
        f"PerSim, section 6.1 and Table 8), generated by persim-jax "
        f"(experiments/datagen/datasets.py, `python -m experiments.make_dataset "
        f"--env={metadata['env']} --dataset={metadata['dataset']} --seed={metadata['seed']}"
        + (f" --num_agents={metadata['num_agents']}"
           if metadata["num_agents"] != default_agents else "") + " --minari`).",
        f"{metadata['num_agents']} heterogeneous agents, one trajectory each (one Minari "
        f"episode per agent; its agent_id and covariates in the episode's metadata), "
        f"{metadata['num_transitions']} transitions, seed {metadata['seed']}, episode cap "
        f"{metadata['episode_cap']} steps.",
        f"Behaviour: {metadata['behaviour']}.",
        f"Table 8, ours: test-agent returns {stats['test_agent_return']}, mean return "
        f"{stats['mean_return']}, mean length {stats['mean_length']}.",
    ]
    if paper:
        lines.append(f"Table 8, the paper's: test-agent returns {paper['test_agent_return']}, "
                     f"mean return {paper['mean_return']}, mean length {paper['mean_length']}.")
    return "\n".join(lines)


def write_paper_dataset(transitions: data.Transitions, metadata: dict, *, default_agents: int,
                        force: bool = False) -> tuple[str, bool]:
    """Writes one of the paper's datasets as the local Minari dataset
    `paper_id(...)`, unless that id already holds the same request (env,
    dataset, seed, agents, policies) and `force` is False.

    Returns:
      (dataset id, whether it was written).
    """
    request = {k: metadata.get(k) for k in ("version", "env", "dataset", "seed", "num_agents",
                                            "policies_sha256")}
    minari_id = paper_id(metadata["env"], metadata["dataset"], metadata["seed"],
                         metadata["num_agents"], default_agents)
    try:
        if not force and minari_id in minari_io.local_dataset_ids():
            stored = minari_io.load_local(minari_id).storage.metadata.get("persim") or {}
            if (stored.get("source") or {}).get("request") == request:
                return minari_id, False
        source = {"generator": "experiments.datagen.datasets.generate", "request": request,
                  **{k: metadata.get(k) for k in ("epsilon", "behaviour", "episode_cap",
                                                  "policy_counts", "stats", "paper")}}
        data.to_minari(transitions, minari_id,
                       description=paper_description(metadata, default_agents),
                       author="persim-jax", algorithm_name=metadata["behaviour"],
                       source=source, overwrite=True)
    except (ImportError, ValueError, OSError) as error:
        raise UserError(f"--minari: {' '.join(str(error).split())}") from None
    return minari_id, True
