"""The user's own logged data: reading the file, the time-ordered hold-out, and
the personalisation stage (PerSim vs the population model vs "no change" on
each agent's held-out future, `experiments.personalisation`).

    transitions, metadata = own_data.load(path, env_name, loader_options)
"""

from __future__ import annotations

import hashlib
import os
import time
import zipfile

import numpy as np

import envs
from experiments import minari_data, personalisation
from experiments.cache import RunDirectory, say
from experiments.config import RunConfig, UserError
from experiments.stages import covariate_names, train_stage
from persim_jax import data, methods

# How the CLI reads a long-format file by default (`data.from_long_format`'s
# options; the flags --agent_column ... --allow_outliers change them).
LOADER_DEFAULTS = dict(agent_column="agent_id", time_column="time", state_prefix="obs_",
                       action_prefix="action", covariate_prefix="cov_", discrete_actions=None,
                       allow_outliers=False)

# The loaders' option names in their messages -> the CLI's flags: the library
# names its keyword arguments, a CLI user knows the flags.
CLI_WORDS = {
    "allow_outliers=True": "--allow_outliers",
    "time_column (pass time_column=None if rows are in time order)":
        "--time_column (--time_column='' if each agent's rows are in time order)",
    "discrete_actions=False, or leave it out to infer it": "leave out --discrete_actions",
    "pass state_columns=[...] or state_prefix=...": "pass --state_prefix",
    "pass action_columns=[...] or action_prefix=...": "pass --action_prefix",
    "agent_column: column": "--agent_column: column",
    "(named by the covariate prefix, or covariate_columns)": "(named by --covariate_prefix)",
}

# RunConfig fields that mean something for own data without an env.
OWN_DATA_SETTINGS = ("trials", "rank", "rank_used", "ensemble_size", "epochs", "batch_size",
                     "learning_rate", "lr_halving_epochs", "state_hidden", "action_hidden",
                     "standardize", "open_loop_steps")


def run_name(dataset: str) -> str:
    """The run directory's name of a user's file: its name without extension
    (of `minari:<id>`: `minari_data.run_name`)."""
    if minari_data.is_minari(dataset):
        return minari_data.run_name(dataset)
    return os.path.splitext(os.path.basename(dataset))[0]


def load(path: str, env_name: str | None, loader_options: dict | None = None):
    """(Transitions, metadata) of the user's file, read with `loader_options`
    (`LOADER_DEFAULTS`' keys); UserError names any problem."""
    if minari_data.is_minari(path):        # a local Minari dataset: `minari_data`
        transitions, metadata = minari_data.load(
            path, {**LOADER_DEFAULTS, **(loader_options or {})}, LOADER_DEFAULTS)
        if env_name is not None:
            check_matches_env(transitions, envs.make(env_name), path)
        return transitions, metadata
    if not os.path.isfile(path):
        raise UserError(f"--dataset: no such file: {path}")
    options = {**LOADER_DEFAULTS, **(loader_options or {})}
    transitions = load_user_file(path, options)
    if env_name is not None:
        check_matches_env(transitions, envs.make(env_name), path)
    with open(path, "rb") as handle:
        file_digest = hashlib.sha256(handle.read()).hexdigest()
    metadata = {"path": os.path.abspath(path), "sha256": file_digest,
                "num_agents": transitions.num_agents,
                "num_transitions": transitions.num_transitions, "read": True,
                # What the trained models depend on besides the file: how it
                # was read, and the time-ordered hold-out.
                "loader": {**options, "held_out": "last 20% per agent"}}
    return transitions, metadata


def _npz_options(path: str, options: dict) -> dict:
    changed = [f"--{k}" for k, v in options.items()
               if k != "allow_outliers" and v != LOADER_DEFAULTS[k]]
    if changed:
        raise UserError(f"{', '.join(changed)}: column names apply to .csv / .parquet "
                        f"files, not to {path}")
    return {"allow_outliers": options["allow_outliers"]}


def load_user_file(path: str, options: dict | None = None):
    """The user's file as Transitions: .npz (ids mapped to 0..N-1 unless the
    file holds `agent_keys`) or long format (.csv / .parquet, the columns
    named by `options`, any agent ids mapped to 0..N-1)."""
    options = {**LOADER_DEFAULTS, **(options or {})}
    if minari_data.is_minari(path):
        return minari_data.load(path, options, LOADER_DEFAULTS)[0]
    extension = os.path.splitext(path)[1].lower()
    loaders = {".npz": data.load_npz, ".csv": data.load_csv, ".parquet": data.load_parquet}
    if extension not in loaders:
        raise UserError(f"--dataset: {path}: unknown file type {extension!r}; expected .npz, "
                        f".csv or .parquet")
    if extension == ".npz":
        kwargs = _npz_options(path, options)
    else:
        kwargs = dict(options, map_agent_ids=True, time_column=options["time_column"] or None,
                      covariate_prefix=options["covariate_prefix"] or None)
    try:
        if extension == ".npz":
            with np.load(path, allow_pickle=False) as file:
                kwargs["map_agent_ids"] = "agent_keys" not in file.files
        return loaders[extension](path, **kwargs)
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as error:
        message = str(error)
        for library, flag in CLI_WORDS.items():
            message = message.replace(library, flag)
        if os.fspath(path) not in message:
            message = f"{path}: {message}"
        raise UserError(f"--dataset: {message}") from None


def check_matches_env(transitions, env, path: str) -> None:
    """UserError unless the file's states and actions are `env`'s."""
    if transitions.obs_dim != env.obs_dim:
        raise UserError(f"--dataset: {path}: states have {transitions.obs_dim} dimensions, "
                        f"{env.name} has {env.obs_dim}")
    if transitions.discrete != env.discrete_actions:
        kind = "discrete" if transitions.discrete else "continuous"
        env_kind = "discrete" if env.discrete_actions else "continuous"
        raise UserError(f"--dataset: {path}: {kind} actions, {env.name} has {env_kind} ones")


def split(transitions):
    """(training transitions, held-out indices into `transitions`): the
    models learn each agent's first 80 %; the last 20 % is its future, on
    which the personalisation report scores them."""
    train_index, held_out = data.time_ordered_split(transitions,
                                                    personalisation.HELD_OUT_FRACTION)
    return transitions.select(train_index), held_out


def population_models(run: RunDirectory, config: RunConfig, training, trained: dict,
                      seed: int, dataset_digest: str) -> list:
    """The population model, [one per trial]: --methods' own, else trained
    here (one trial) on `training`."""
    population = trained.get(methods.Population.name)
    if population is None:
        population, _ = train_stage(run, methods.Population(config.training()), training, 1,
                                    seed, dataset_digest, None)
    return population


def personalisation_stage(run: RunDirectory, config: RunConfig, everything, training, held_out,
                          trained: dict, population: list) -> dict:
    """Own data: PerSim, the population model and "no change" on the held-out
    end of every trajectory (`experiments.personalisation`).

    Args:
      everything: all transitions; training: the first 80 % of each agent's;
      held_out: (H,) indices into `everything` of the last 20 %.
      trained: {method name: [one per trial]} of the run's methods;
      population: the population model (`population_models`).
    """
    steps = config.open_loop_steps or personalisation.DEFAULT_OPEN_LOOP_STEPS
    spread = np.asarray(training.obs, np.float64).std(axis=0)
    start = time.time()
    with run.stage("validation", f"PerSim vs the population model vs no change on the last "
                   f"{personalisation.HELD_OUT_FRACTION:.0%} of each trajectory: one-step and "
                   f"{steps}-step open-loop error"):
        validation = personalisation.evaluate(
            {"persim": trained[methods.PerSim.name][0], "population": population[0]},
            everything, held_out, spread, open_loop_steps=steps)
    run.timing["validation"] = round(time.time() - start, 2)
    say(f"[validation] {validation['personalisation']['statement']}")
    return validation


def settings(record: dict, transitions) -> dict:
    """results.json "config" of an own-data run without an env: the settings
    that apply (no planner, episodes or generated-dataset size)."""
    record = {k: record.get(k) for k in OWN_DATA_SETTINGS}
    if transitions.discrete:
        del record["action_hidden"]     # discrete actions: one linear layer on the one-hot
    record["open_loop_steps"] = (record["open_loop_steps"]
                                 or personalisation.DEFAULT_OPEN_LOOP_STEPS)
    record["methods"] = ["persim", "population"]
    return record


def description(transitions, metadata: dict) -> dict:
    """results.json "data" of an own-data run: what was read, in the file's names."""
    return {"path": metadata["path"], "sha256": metadata["sha256"],
            "agents": transitions.num_agents, "transitions": transitions.num_transitions,
            "state_names": list(transitions.state_names or
                                [f"state_{j}" for j in range(transitions.obs_dim)]),
            "actions": (f"discrete actions 0..{transitions.num_actions - 1}"
                        if transitions.discrete else
                        f"continuous actions ({transitions.action_dim} dimension"
                        f"{'s' if transitions.action_dim > 1 else ''})"),
            "covariate_names": (None if transitions.covariates is None else
                                list(covariate_names(None, transitions))),
            "agent_ids": [str(k) for k in (transitions.agent_keys
                                           or range(transitions.num_agents))],
            "loader": metadata.get("loader")}


def summary_line(transitions) -> str:
    """One progress line: what the loader understood of the user's file."""
    states = ", ".join(transitions.state_names or [f"{transitions.obs_dim} dimensions"])
    actions = (f"discrete actions 0..{transitions.num_actions - 1}" if transitions.discrete
               else f"{transitions.action_dim}-d continuous actions")
    covariates = ("no covariates" if transitions.covariates is None else
                  "covariates " + ", ".join(covariate_names(None, transitions)))
    return f"states {states}; {actions}; {covariates}"
