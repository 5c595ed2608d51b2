"""The paper's published numbers (PerSim, Agarwal et al. 2021), for reports.

`paper_tables.json` beside this module is the project's own copy of the
transcription of Tables 1 and 8-14 (anomalies listed under its "notes"), so a
clone without the shared reference folder still reports the paper's numbers.

    from experiments import paper
    rows = paper.paper_rows("cartpole", "pure")
    rows["prediction"]["persim"]["rmse"]      # [0.003, 0.009, ...], one per test agent
    rows["reward"]["bcq_p"]["mean"]           # [166.2, 187.4, ...]
    rows["true_env_mpc"]["mean"]              # [198.9, 191.2, ...]
    paper.paper_rows("cartpole", "my_logs.csv")  # a user's data: None / empty rows
"""

from __future__ import annotations

import copy
import functools
import json
import os

TABLES_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_tables.json")

# Display names of the paper's methods, in the paper's row order.
METHOD_NAMES = {
    "persim": "PerSim",
    "vanilla_cadm": "Vanilla CaDM",
    "pe_ts_cadm": "PE-TS CaDM",
    "bcq_p": "BCQ-P",
    "bcq_a": "BCQ-A",
}


@functools.lru_cache(maxsize=1)
def _load_cached() -> dict:
    try:
        with open(TABLES_PATH, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"the paper's tables are missing: expected {TABLES_PATH} (it ships with the "
            "experiments package)") from err


def load_tables() -> dict:
    """The whole transcription: keys source, envs, datasets, dataset_stats,
    prediction, reward (with reward["true_env_mpc"][env]) and notes. A copy, so
    callers may modify it."""
    return copy.deepcopy(_load_cached())


def paper_rows(env: str, dataset: str) -> dict:
    """The paper's rows for one env x dataset.

    Returns {"dataset_stats": {test_agent_return, mean_return, mean_length} or
    None, "prediction": {method: {rmse, r2_median}}, "reward": {method: {mean,
    std}}, "true_env_mpc": {mean, std} or None}. Lists have one value per test
    agent (Table 1's order). A dataset the paper does not have (a user's own
    file, whose test agents are not Table 1's) or an env it does not have gets
    None stats, empty method dicts and None true_env_mpc.
    """
    tables = _load_cached()
    if env not in tables["envs"] or dataset not in tables["datasets"]:
        return {"dataset_stats": None, "prediction": {}, "reward": {}, "true_env_mpc": None}
    return copy.deepcopy({
        "dataset_stats": tables["dataset_stats"].get(env, {}).get(dataset),
        "prediction": tables["prediction"].get(env, {}).get(dataset, {}),
        "reward": tables["reward"].get(env, {}).get(dataset, {}),
        "true_env_mpc": tables["reward"].get("true_env_mpc", {}).get(env),
    })
