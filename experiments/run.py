"""The whole PerSim pipeline for one env × dataset, our numbers beside the paper's.

    python -m experiments.run --env=cartpole --dataset=pure            # quick preset
    python -m experiments.run --env=halfcheetah --dataset=random --preset=paper   # a GPU
    python -m experiments.run --env=cartpole --dataset=my_logs.csv     # your own data
    python -m experiments.run --env=mountaincar --dataset=random --rank=5 --epochs=50

Stages, each shown as it runs and skipped on a re-run when its inputs and
settings are unchanged (`--force` redoes them all):

  dataset     the paper's dataset, generated once by our own code and cached
              under `--data_dir` (or the user's `.npz` / `.csv` / `.parquet`);
  train       `--trials` ensembles of personalised simulators (orbax
              checkpoints, so an interrupted run resumes; the trained simulator
              is kept and reused while the settings match);
  prediction  the paper's open-loop prediction error on the 5 test agents
              (10 teacher-forced steps, then 50 open-loop; RMSE, median R²);
  reward      MPC episodes of the 5 test agents planned on their learned
              simulators (PerSim) and on their true physics (True env + MPC);
  plots       t-SNE of the agent factors coloured by each hidden covariate,
              predicted vs true trajectories of two test agents;
  report      `results.json` and `report.md` (ours beside Tables 8–14).

`--planner=icem` plans continuous actions with iCEM (Pinneri et al. 2020) at a
quarter of the paper CEM's model evaluations instead of its CEM.

Everything goes to `<out_dir>/<env>/<dataset>/`, written atomically. Presets:
`quick` (default) is sized for a 2-core CPU, `paper` uses the paper's settings
(300 epochs, 1000 / 200 candidates, 20 episodes × 5 trials) and is meant for a
GPU; any setting can be overridden by its flag. The presets live in the
registry `experiments/paper.py`; the run's settings are one `RunConfig`
(`experiments/config.py`). The compared methods (`persim_jax.methods`) go
through the same stages; each has its own keys.

Own data: `--dataset=PATH` reads the file (long format: `--agent_column`,
`--time_column`, `--state_prefix`, `--action_prefix`, `--covariate_prefix`,
`--discrete_actions`; any agent ids, mapped to 0..N-1 and kept), trains PerSim
and the population model on the first 80 % of each agent's trajectory, and
reports whether personalisation helps on the last 20 % (one-step and
`--open_loop_steps` open-loop error per agent and state dimension,
`experiments.personalisation`); given `--env` and covariates in the file
(units 0..4 inside the env's ranges), it also plans for those agents.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging as std_logging
import os
import shutil
import sys
import time
import zipfile
from typing import Any, Sequence

if __name__ == "__main__":
    # One JAX CPU device per core (JAX_NUM_CPU_DEVICES=1 keeps JAX's single
    # device), before gymnax, imported by envs, starts JAX's backends.
    from persim_jax import runtime
    runtime.use_cpu_cores()

import jax
import numpy as np
from absl import app, flags, logging

import envs
from experiments import config as config_lib
from experiments import paper, personalisation
from experiments.config import RunConfig, UserError
from experiments.datagen import datasets, policies
from persim_jax import data, evaluation, methods, planning
from persim_jax.model import Simulator

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI's flags, defined only when it runs as a program (other
    experiments modules define `--env` too, and tests import several)."""
    flags.DEFINE_enum("env", None, list(envs.ENV_NAMES),
                      "Environment (its physics, known reward and test agents).")
    flags.DEFINE_string("dataset", "pure",
                        f"One of {', '.join(datasets.DATASETS)}, or a path to your own .npz / .csv / "
                        f".parquet file.")
    flags.DEFINE_enum("preset", "quick", ["quick", "paper"],
                      "quick: sized for a 2-core CPU; paper: the paper's settings (a GPU).")
    flags.DEFINE_integer("seed", 0, "Seed of the dataset, training (trial k uses seed + k) and "
                         "evaluation.")
    flags.DEFINE_integer("trials", None, "Independent training seeds (paper: 5).")
    flags.DEFINE_string("out_dir", "runs", "Results go to <out_dir>/<env>/<dataset>/.")
    flags.DEFINE_string("data_dir", datasets.DEFAULT_DATA_DIR, "Dataset cache.")
    flags.DEFINE_integer("num_agents", None, "Agents in a generated dataset (paper: 500).")
    flags.DEFINE_string("rank", None, "Latent factors r, or 'auto' (chosen by validation).")
    flags.DEFINE_integer("ensemble_size", None, "Ensemble members M (paper: 5).")
    flags.DEFINE_integer("epochs", None, "Training epochs (paper: 300).")
    flags.DEFINE_integer("batch_size", None,
                         "Minibatch size (paper: 256; here CartPole 64, MountainCar 32).")
    flags.DEFINE_float("learning_rate", None, "Adam step size (paper: 1e-3).")
    flags.DEFINE_integer("lr_halving_epochs", None,
                         "Halve the step size every this many epochs (paper: 150); 0 keeps it "
                         "constant.")
    flags.DEFINE_bool("standardize", None,
                      "Standardise model inputs and Δ targets (default: raw for CartPole and "
                      "MountainCar, as the authors' code; standardised for HalfCheetah and "
                      "your own data).")
    flags.DEFINE_list("state_hidden", None, "Hidden sizes of the state encoder, e.g. 256,512,512.")
    flags.DEFINE_list("action_hidden", None,
                      "Hidden sizes of the continuous action encoder (paper: 256,256).")
    flags.DEFINE_enum("planner", None, list(config_lib.PLANNER_KINDS),
                      "paper: random shooting / CEM as the paper; icem: iCEM (continuous "
                      "actions) at a quarter of the paper CEM's model evaluations.")
    flags.DEFINE_integer("candidates", None,
                         "Random-shooting candidates (paper: 1000), CEM samples (paper: 200) or "
                         "iCEM's first population.")
    flags.DEFINE_integer("horizon", None, "Planning horizon (paper: 30; MountainCar 50).")
    flags.DEFINE_integer("cem_rounds", None, "CEM refinement rounds after the first (paper: 5).")
    flags.DEFINE_integer("cem_elites", None, "CEM elites (paper: 50).")
    flags.DEFINE_enum("aggregation", None, ["min", "mean"],
                      "Ensemble aggregation of candidate returns (paper: min).")
    flags.DEFINE_float("discount", None, "Planning discount (paper: 0.93).")
    flags.DEFINE_integer("episodes", None, "MPC episodes per test agent and trial (paper: 20).")
    flags.DEFINE_integer("max_steps", None, "Steps per MPC episode (default: the env's cap).")
    flags.DEFINE_integer("prediction_episodes", None,
                         "Episodes per test agent of the prediction-error test (paper: 200).")
    flags.DEFINE_bool("true_env_mpc", None, "Also plan on the true physics (the upper-bound row).")
    flags.DEFINE_list("methods", None,
                      f"Methods to compare: {', '.join(METHODS)}, or all (default: persim, and "
                      f"true_env_mpc unless --notrue_env_mpc).")
    flags.DEFINE_integer("bcq_iterations", None, "BCQ gradient steps (paper: 5.5e5).")
    flags.DEFINE_integer("cadm_iterations", None,
                         "CaDM fits of <= 5 epochs each (paper: 100).")
    flags.DEFINE_integer("cadm_pairs_per_epoch", None,
                         "(context, transition) pairs per CaDM epoch (default: all).")
    flags.DEFINE_integer("cadm_particles", None,
                         "PE-TS CaDM particles when planning (paper: 20).")
    flags.DEFINE_integer("policy_episodes", None,
                         "Episodes per test agent of the model-free methods (paper: 100).")
    flags.DEFINE_integer("open_loop_steps", None,
                         "Own data: k of the held-out k-step open-loop error (default 10).")
    flags.DEFINE_list("skip", [], "Stages to skip: prediction, reward, plots.")
    flags.DEFINE_bool("force", False, "Redo every stage, even those already done.")
    # Own data in long format (.csv / .parquet): which columns hold what.
    flags.DEFINE_string("agent_column", "agent_id",
                        "Own data: the agent id column (any ids, e.g. adult#001; mapped to "
                        "0..N-1, and every per-agent output keeps your ids).")
    flags.DEFINE_string("time_column", "time",
                        "Own data: the time-step column; '' if the rows of each agent are in "
                        "time order.")
    flags.DEFINE_string("state_prefix", "obs_", "Own data: state columns start with this.")
    flags.DEFINE_string("action_prefix", "action", "Own data: action columns start with this.")
    flags.DEFINE_string("covariate_prefix", "cov_",
                        "Own data: covariate columns (one value per agent, repeated on its "
                        "rows) start with this; '' for none.")
    flags.DEFINE_bool("discrete_actions", None,
                      "Own data: the one action column holds discrete actions 0..K-1 "
                      "(default: inferred, discrete when every value is an integer).")
    flags.DEFINE_bool("allow_outliers", False,
                      "Own data: accept values more than 1e6 times their column's typical "
                      "magnitude (by default an error naming the line and column).")


STAGES = ("dataset", "train", "prediction", "reward", "plots", "report")


def resolve_settings(env_name: str | None, dataset: str, preset: str = "quick",
                     overrides: dict[str, Any] | None = None) -> RunConfig:
    """The run's config (see `experiments.config.resolve`)."""
    return config_lib.resolve(env_name, dataset, preset, overrides)


def settings_from_flags() -> RunConfig:
    return resolve_settings(FLAGS.env, FLAGS.dataset, FLAGS.preset,
                            {name: getattr(FLAGS, name) for name in config_lib.OVERRIDABLE})


def _bcq(kind):
    def make(env, config: RunConfig):
        from persim_jax import bcq

        return kind(bcq)(bcq.BCQConfig(iterations=config.bcq_iterations))
    return make


def _cadm(probabilistic: bool):
    def make(env, config: RunConfig):
        from persim_jax import cadm

        base, kind = (cadm.PE_TS, cadm.PETSCaDM) if probabilistic else (cadm.VANILLA,
                                                                        cadm.VanillaCaDM)
        fields = {"pairs_per_epoch": config.cadm_pairs_per_epoch}
        if config.cadm_iterations is not None:
            fields["iterations"] = config.cadm_iterations
        if probabilistic and config.cadm_particles is not None:
            fields["particles"] = config.cadm_particles
        try:
            return kind(dataclasses.replace(base, **fields))
        except ValueError as error:
            raise UserError(f"CaDM settings: {error}") from None
    return make


# The harness's methods, by name, in the reports' order: how each is built
# from the env and the run's config.
METHODS = {
    "persim": lambda env, config: methods.PerSim(config.training()),
    "true_env_mpc": lambda env, config: methods.TrueEnvMPC(env),
    "vanilla_cadm": _cadm(probabilistic=False),
    "pe_ts_cadm": _cadm(probabilistic=True),
    "bcq_p": _bcq(lambda bcq: bcq.BCQP),
    "bcq_a": _bcq(lambda bcq: bcq.BCQA),
    "population": lambda env, config: methods.Population(config.training()),
    "per_agent": lambda env, config: methods.PerAgent(config.training()),
}


def methods_for(env, config: RunConfig) -> list[methods.Method]:
    """The methods a run compares (`RunConfig.method_names`); without an env
    (own data, no test agents), PerSim only."""
    names = config.method_names(tuple(METHODS))
    if env is None:
        if set(names) - {"persim", "true_env_mpc"}:
            raise UserError("--methods: comparing methods needs --env (the test agents' "
                            "true physics); own data without an env trains PerSim only")
        names = ("persim",)
    return [METHODS[name](env, config) for name in names]


def planner_for(env, config: RunConfig):
    """The run's planner for `env` (`RunConfig.planner_config`), with the
    env's known reward and termination."""
    return planning.make_planner(config.planner_config(env), env)


def planner_description(planner) -> dict:
    return {"kind": type(planner.config).__name__, **dataclasses.asdict(planner.config)}


def digest(payload) -> str:
    """A short SHA-256 of `payload` (JSON-able): the stages' cache keys."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _say(message: str) -> None:
    """A progress line of the pipeline (absl logging, INFO, at the caller's line)."""
    logging.info("%s", message, stacklevel=2)


# ---------------------------------------------------------------------------
# Stage bookkeeping


class Run:
    """The output directory of one run, its stage records and timings."""

    def __init__(self, directory: str, force: bool):
        self.directory = directory
        self.force = force
        self.timing: dict[str, float] = {}

    def path(self, *parts) -> str:
        return os.path.join(self.directory, *parts)

    def _record_path(self, stage: str) -> str:
        return self.path("stages", f"{stage}.json")

    def cached(self, stage: str, key: str):
        """The stored result of `stage` if it was done with `key`, else None."""
        path = self._record_path(stage)
        if self.force or not os.path.exists(path):
            return None
        try:
            with open(path) as handle:
                record = json.load(handle)
        except (OSError, json.JSONDecodeError):
            return None
        if record.get("key") != key:
            return None
        self.timing[stage] = record.get("seconds", 0.0)
        return record["result"]

    def store(self, stage: str, key: str, result, seconds: float):
        self.timing[stage] = round(seconds, 2)
        os.makedirs(self.path("stages"), exist_ok=True)
        write_json(self._record_path(stage), {"key": key, "seconds": round(seconds, 2),
                                              "result": result})
        return result

    def sum_timings(self, stage: str) -> None:
        """One timing for `stage` from its per-method / per-trial records."""
        parts = [name for name in self.timing if name.startswith(f"{stage}_")]
        if parts:
            self.timing[stage] = round(self.timing.get(stage, 0.0)
                                       + sum(self.timing.pop(name) for name in parts), 2)

    @contextlib.contextmanager
    def stage(self, name: str, what: str):
        _say(f"[{name}] {what}")
        start = time.time()
        yield
        _say(f"[{name}] done in {time.time() - start:.1f} s")


def write_json(path: str, payload) -> None:
    with data.atomic_write(path, "w") as handle:
        json.dump(payload, handle, indent=1, default=_json_default)
        handle.write("\n")


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _floats(values) -> list[float]:
    return [float(x) for x in np.asarray(values, np.float64).ravel()]


def _config_record(config: RunConfig) -> dict:
    """`dataclasses.asdict(config)` as JSON has it (tuples as lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(config).items()}


# ---------------------------------------------------------------------------
# Stages


# How the CLI reads a long-format file by default (`data.from_long_format`'s
# options; the flags --agent_column ... --allow_outliers change them).
LOADER_DEFAULTS = dict(agent_column="agent_id", time_column="time", state_prefix="obs_",
                       action_prefix="action", covariate_prefix="cov_", discrete_actions=None,
                       allow_outliers=False)


# The loaders' option names in their messages -> the CLI's flags.
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


def loader_options_from_flags() -> dict:
    return {name: getattr(FLAGS, name) for name in LOADER_DEFAULTS}


def load_dataset(env_name: str | None, dataset: str, config: RunConfig, seed: int,
                 data_dir: str, loader_options: dict | None = None):
    """(Transitions, metadata, name): the paper's dataset (cached) or the
    user's file, read with `loader_options` (`LOADER_DEFAULTS`' keys)."""
    if dataset in datasets.DATASETS:
        transitions, metadata = datasets.load_or_generate(
            env_name, dataset, data_dir=data_dir, seed=seed, num_agents=config.num_agents)
        return transitions, metadata, dataset
    path = dataset
    if not os.path.isfile(path):
        if os.sep not in path and "." not in path:
            raise UserError(f"--dataset: {path!r} is neither one of "
                            f"{', '.join(datasets.DATASETS)} nor a file")
        raise UserError(f"--dataset: no such file: {path}")
    options = {**LOADER_DEFAULTS, **(loader_options or {})}
    transitions = _load_user_file(path, options)
    if env_name is not None:
        _check_matches_env(transitions, envs.make(env_name), path)
    with open(path, "rb") as handle:
        file_digest = hashlib.sha256(handle.read()).hexdigest()
    metadata = {"path": os.path.abspath(path), "sha256": file_digest,
                "num_agents": transitions.num_agents,
                "num_transitions": transitions.num_transitions, "read": True,
                # What the trained models depend on besides the file: how it
                # was read, and the time-ordered hold-out.
                "loader": {**options, "held_out": "last 20% per agent"}}
    return transitions, metadata, _run_name(path)


def dataset_identity(metadata: dict) -> dict:
    """What trained models depend on in a dataset, for the stage keys: the
    file's contents and how it was read (the user's file), or the generation
    request (the paper's datasets, which our code regenerates bit for bit);
    never where it lies, so that moving a data folder retrains nothing."""
    identity = {k: metadata.get(k) for k in ("sha256", "version", "env", "dataset", "seed",
                                             "num_agents", "policies_sha256")}
    if metadata.get("loader") is not None:
        identity["loader"] = metadata["loader"]
    return identity


def _load_user_file(path: str, options: dict | None = None):
    """The user's file as Transitions: .npz (ids mapped to 0..N-1 unless the
    file holds `agent_keys`) or long format (.csv / .parquet, the columns
    named by `options`, any agent ids mapped to 0..N-1)."""
    options = {**LOADER_DEFAULTS, **(options or {})}
    extension = os.path.splitext(path)[1].lower()
    loaders = {".npz": data.load_npz, ".csv": data.load_csv, ".parquet": data.load_parquet}
    if extension not in loaders:
        raise UserError(f"--dataset: {path}: unknown file type {extension!r}; expected .npz, "
                        f".csv or .parquet")
    if extension == ".npz":
        changed = [f"--{k}" for k, v in options.items()
                   if k != "allow_outliers" and v != LOADER_DEFAULTS[k]]
        if changed:
            raise UserError(f"{', '.join(changed)}: column names apply to .csv / .parquet "
                            f"files, not to {path}")
        kwargs = {"allow_outliers": options["allow_outliers"]}
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


def _check_matches_env(transitions, env, path: str) -> None:
    if transitions.obs_dim != env.obs_dim:
        raise UserError(f"--dataset: {path}: states have {transitions.obs_dim} dimensions, "
                        f"{env.name} has {env.obs_dim}")
    if transitions.discrete != env.discrete_actions:
        kind = "discrete" if transitions.discrete else "continuous"
        env_kind = "discrete" if env.discrete_actions else "continuous"
        raise UserError(f"--dataset: {path}: {kind} actions, {env.name} has {env_kind} ones")


def train_stage(run: Run, method: methods.Method, transitions, trials: int, seed: int,
                dataset_key: str, agent_ids) -> tuple[list, float]:
    """Trains (or reloads) `method` once per trial: (what it trained, one per
    trial, and the training seconds, stored ones for reused trials). A method
    that does not train gives ([None], 0): one evaluation, no trials."""
    if not method.trains:
        return [None], 0.0
    trained, seconds = [], 0.0
    agents = None if agent_ids is None else [int(a) for a in agent_ids]
    for trial in range(trials):
        key = digest({"dataset": dataset_key, "train": method.training_description(),
                       "seed": seed + trial, "method": method.name, "agents": agents})
        stage = f"train_{method.name}_trial{trial}"
        path = run.path(_artefact_name(method, trial))
        record = run.cached(stage, key)
        if record is not None and os.path.exists(path):
            trained.append(method.load(path))
            seconds += run.timing.get(stage, 0.0)
            _say(f"[train] trial {trial}: reusing {path}")
            continue
        start = time.time()
        _say(f"[train] trial {trial}: {method.name}, {transitions.num_transitions} transitions, "
             f"{method.description()}")
        result = method.train(transitions, method.key("train", seed, trial),
                              workdir=run.path("checkpoints", key, f"trial{trial}"),
                              agent_ids=agents)
        method.save(result, path)
        shutil.rmtree(run.path("checkpoints", key), ignore_errors=True)
        with contextlib.suppress(OSError):       # only when no other run's are left
            os.rmdir(run.path("checkpoints"))
        run.store(stage, key, _train_record(result), time.time() - start)
        seconds += run.timing[stage]
        trained.append(result)
    run.sum_timings("train")
    return trained, round(seconds, 2)


def _artefact_name(method: methods.Method, trial: int) -> str:
    # PerSim's file name predates the other methods.
    prefix = "simulator" if method.name == methods.PerSim.name else method.name
    return f"{prefix}_trial{trial}.msgpack"


def _train_record(trained) -> dict:
    if isinstance(trained, Simulator):
        return {"rank": trained.rank, "validation_loss": _floats(trained.validation_loss),
                "rank_losses": trained.rank_losses}
    return {}


def test_agents_of(env, transitions):
    """(covariates (K, P), agent ids (K,)) of the agents evaluated: units
    0..4 of the dataset (the paper's test agents for its datasets)."""
    if transitions.covariates is None:
        return None, None
    count = min(5, transitions.num_agents)
    covariates = np.asarray(transitions.covariates)[:count]
    try:
        env.agents.validate(covariates)
    except ValueError as error:
        logging.warning("[evaluation] skipped: units 0..%d of the data are not %s agents inside "
                        "the paper's ranges (%s)", count - 1, env.name, error)
        return None, None
    return covariates, np.arange(count)


def prediction_stage(run: Run, env, method: methods.Method, trained: list, covariates,
                     agent_ids, config: RunConfig, seed: int, train_key) -> dict:
    """The paper's open-loop prediction error of `method`, averaged over trials."""
    key = digest({"train": train_key, "method": method.name,
                   "episodes": config.prediction_episodes, "agents": agent_ids.tolist(),
                   "seed": seed})
    stage = f"prediction_{method.name}"
    cached = run.cached(stage, key)
    if cached is not None:
        _say("[prediction] reusing the stored result")
        return cached
    start = time.time()
    test_policy = policies.test_policy(env)
    summaries = []
    with run.stage("prediction", f"{method.name}: {len(agent_ids)} agents × "
                   f"{config.prediction_episodes} episodes of the test policy, 10 teacher-forced "
                   f"+ 50 open-loop steps, {len(trained)} trial(s)"):
        for trial, model in enumerate(trained):
            errors = evaluation.prediction_error(
                method.key("prediction", seed, trial),
                method.dynamics_for_agent(model, agent_ids, for_planning=False), env,
                test_policy, covariates, num_episodes=config.prediction_episodes)
            summaries.append(errors.summary())
    result = {
        "rmse": _floats(np.mean([s["rmse"] for s in summaries], axis=0)),
        "rmse_std": _floats(np.mean([s["rmse_std"] for s in summaries], axis=0)),
        "r2_median": _floats(np.mean([s["r2_median"] for s in summaries], axis=0)),
        "horizon": 50, "warmup": 10, "episodes": config.prediction_episodes,
        "trials": len(trained),
    }
    return run.store(stage, key, result, time.time() - start)


def reward_stage(run: Run, env, method: methods.Method, trained: list, covariates, agent_ids,
                 planner, config: RunConfig, seed: int, train_key) -> dict:
    """MPC returns of `method` on the test agents: {mean, std, returns}, the
    std over trials (several) or over one trial's episodes."""
    model_based = method.kind == "model"
    own = None
    if model_based:       # a method may plan with its own objective (CaDM)
        config_of_method = method.planner_config(planner.config)
        if config_of_method != planner.config:
            planner = planning.make_planner(config_of_method, env)
            own = planner_description(planner)
    # Where the candidates run (shard_candidates) does not change the returns
    # (tests/test_evaluation.py): it is recorded but not part of the key.
    planner_key = ({k: v for k, v in planner_description(planner).items()
                    if k != "shard_candidates"} if model_based else None)
    episodes = config.episodes if model_based else config.policy_episodes
    key = digest({"train": train_key if method.trains else None, "method": method.name,
                   "planner": planner_key, "episodes": episodes,
                   "max_steps": config.max_steps, "agents": agent_ids.tolist(), "seed": seed})
    stage = f"reward_{method.name}"
    cached = run.cached(stage, key)
    if cached is not None:
        _say("[reward] reusing the stored result")
        return cached
    start = time.time()
    steps = config.max_steps or env.max_episode_steps
    with run.stage("reward", f"{method.name} {'MPC' if model_based else 'policy'}: "
                   f"{len(agent_ids)} agents × {episodes} episodes × {len(trained)} trial(s), "
                   f"≤ {steps} steps, one compiled program each"):
        per_trial = np.stack([
            _episode_returns(method, model, method.key("reward", seed, trial), planner, env,
                             covariates, agent_ids, episodes, config.max_steps)
            for trial, model in enumerate(trained)])                # (trials, K, E)
    means = per_trial.mean(axis=2)                                     # (trials, K)
    spread = means.std(axis=0) if len(trained) > 1 else per_trial[0].std(axis=1)
    result = {"mean": _floats(means.mean(axis=0)), "std": _floats(spread),
              "returns": per_trial.tolist() if method.trains else per_trial[0].tolist()}
    if own is not None:
        result["planner"] = own
    return run.store(stage, key, result, time.time() - start)


def _episode_returns(method: methods.Method, trained, key, planner, env, covariates, agent_ids,
                     episodes: int, max_steps: int | None) -> np.ndarray:
    """(K, E) returns: MPC on a model-based method's dynamics, or the
    model-free method's own policies."""
    if method.kind == "model":
        return evaluation.run_episodes(key, planner, method.dynamics_for_agent(trained, agent_ids),
                                       env, covariates, episodes, max_steps=max_steps)
    return evaluation.run_policy_episodes(key, method.policy_for_agent(trained, agent_ids), env,
                                          covariates, episodes, max_steps=max_steps)


def factors_stage(run: Run, simulators, transitions) -> None:
    """`agent_factors.npz`: factors (M, N, r) of trial 0 and the covariates."""
    simulator = simulators[0]
    arrays = {"factors": np.asarray(simulator.agent_factors(member=None))}
    if transitions.covariates is not None:
        arrays["covariates"] = np.asarray(transitions.covariates)
    if transitions.agent_keys is not None:
        arrays["agent_keys"] = np.asarray([str(k) for k in transitions.agent_keys])
    with data.atomic_write(run.path("agent_factors.npz")) as handle:
        np.savez(handle, **arrays)


def personalisation_stage(run: Run, config: RunConfig, everything, training, held_out,
                          trained: dict, seed: int, dataset_digest: str) -> dict:
    """Own data: PerSim, the population model and "no change" on the held-out
    end of every trajectory (`experiments.personalisation`). The population
    model is trained here (one trial) unless --methods already trained it.

    Args:
      everything: all transitions; training: the first 80 % of each agent's;
      held_out: (H,) indices into `everything` of the last 20 %.
      trained: {method name: [one per trial]} of the run's methods.
    """
    population = trained.get(methods.Population.name)
    if population is None:
        population, _ = train_stage(run, methods.Population(config.training()), training, 1,
                                    seed, dataset_digest, None)
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
    _say(f"[validation] {validation['personalisation']['statement']}")
    return validation


# RunConfig fields that mean something for own data without an env.
OWN_DATA_SETTINGS = ("trials", "rank", "rank_used", "ensemble_size", "epochs", "batch_size",
                     "learning_rate", "lr_halving_epochs", "state_hidden", "action_hidden",
                     "standardize", "open_loop_steps")


def own_data_settings(record: dict, transitions) -> dict:
    """results.json "config" of an own-data run without an env: the settings
    that apply (no planner, episodes or generated-dataset size)."""
    record = {k: record.get(k) for k in OWN_DATA_SETTINGS}
    if transitions.discrete:
        del record["action_hidden"]     # discrete actions: one linear layer on the one-hot
    record["open_loop_steps"] = (record["open_loop_steps"]
                                 or personalisation.DEFAULT_OPEN_LOOP_STEPS)
    record["methods"] = ["persim", "population"]
    return record


def own_data_description(transitions, metadata: dict) -> dict:
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
                                list(_covariate_names(None, transitions))),
            "agent_ids": [str(k) for k in (transitions.agent_keys
                                           or range(transitions.num_agents))],
            "loader": metadata.get("loader")}


def _describe_own_data(transitions) -> str:
    """One progress line: what the loader understood of the user's file."""
    states = ", ".join(transitions.state_names or [f"{transitions.obs_dim} dimensions"])
    actions = (f"discrete actions 0..{transitions.num_actions - 1}" if transitions.discrete
               else f"{transitions.action_dim}-d continuous actions")
    covariates = ("no covariates" if transitions.covariates is None else
                  "covariates " + ", ".join(_covariate_names(None, transitions)))
    return f"states {states}; {actions}; {covariates}"


def _covariate_names(env, transitions) -> list[str]:
    """The covariates' names: the env's, the file's columns, or covariate_<i>."""
    if env is not None:
        return list(env.covariate_names)
    if transitions.covariate_names is not None:
        return list(transitions.covariate_names)
    return [f"covariate_{i}" for i in range(np.asarray(transitions.covariates).shape[1])]


def plots_stage(run: Run, env, simulators, transitions, covariates, agent_ids, seed) -> list[str]:
    from experiments import figures

    written = []
    factors = np.asarray(simulators[0].agent_factors(member=0))
    labels = ([str(k) for k in transitions.agent_keys]
              if transitions.agent_keys is not None else None)
    if transitions.covariates is not None and transitions.num_agents >= 3:
        written += figures.plot_tsne(factors, np.asarray(transitions.covariates),
                                     _covariate_names(env, transitions), run.path("tsne"),
                                     labels=labels)
    elif env is None and transitions.num_agents >= 3:
        # Own data without covariates: the factors alone (the report says how
        # to add covariates).
        written.append(figures.plot_tsne_factors(factors, run.path("tsne_factors.png"),
                                                 labels=labels))
    if env is not None and agent_ids is not None:
        shown = agent_ids[:2]
        trajectories = evaluation.prediction_trajectories(
            jax.random.PRNGKey(seed + 4000), simulators[0], env, policies.test_policy(env),
            covariates[:2], shown)
        labels = [", ".join(f"{n} {v:g}" for n, v in zip(env.covariate_names, c))
                  for c in covariates[:2]]
        path = run.path("trajectories.png")
        figures.plot_trajectories(trajectories["true"], trajectories["predicted"],
                                  trajectories["valid"], path, labels,
                                  members=trajectories.get("members"))
        written.append(path)
    return [os.path.basename(p) for p in written]


# ---------------------------------------------------------------------------
# The pipeline


def dataset_stage(env_name, dataset, config: RunConfig, seed: int, data_dir: str,
                   loader_options: dict | None = None):
    """(transitions, metadata, name, seconds), with progress lines."""
    start = time.time()
    what = (f"{dataset}: {config.num_agents} agents, one trajectory each"
            if dataset in datasets.DATASETS else f"loading {dataset}")
    _say(f"[dataset] {what}")
    transitions, metadata, name = load_dataset(env_name, dataset, config, seed, data_dir,
                                               loader_options)
    seconds = time.time() - start
    how = ("read" if metadata.get("read") else
           "cached" if metadata.get("cached", True) else "generated")
    _say(f"[dataset] {transitions.num_agents} agents, {transitions.num_transitions} transitions "
         f"({how}, {seconds:.1f} s)")
    if metadata.get("read"):
        _say(f"[dataset] {_describe_own_data(transitions)}")
    if metadata.get("stats"):
        _say(datasets.format_stats(metadata))
    return transitions, metadata, name, seconds


def _evaluate(run: Run, env, chosen, trained, covariates, agent_ids, config, seed, train_keys,
              skip) -> tuple[dict, dict | None]:
    """({method: {"prediction": ... or None, "reward": ... or None}}, the
    planner's description or None without the reward stage)."""
    planner = planner_for(env, config) if "reward" not in skip else None
    rows = {}
    for method in chosen:
        prediction = reward = None
        models, key = trained[method.name], train_keys[method.name]
        if method.predicts and "prediction" not in skip:
            prediction = prediction_stage(run, env, method, models, covariates, agent_ids,
                                          config, seed, key)
        if "reward" not in skip:
            reward = reward_stage(run, env, method, models, covariates, agent_ids, planner,
                                  config, seed, key)
        rows[method.name] = {"prediction": prediction, "reward": reward}
    run.sum_timings("prediction")
    run.sum_timings("reward")
    return rows, None if planner is None else planner_description(planner)


def _reward_summary(rows: dict, planner: dict | None, config: RunConfig, env) -> dict | None:
    """results.json's "reward": PerSim's and True env + MPC's rows, as before
    the methods protocol (`results["methods"]` has every method's)."""
    if planner is None:
        return None
    return {"episodes": config.episodes, "trials": config.trials,
            "max_steps": config.max_steps or env.max_episode_steps, "planner": planner,
            "persim": rows[methods.PerSim.name]["reward"],
            "std_over": "trials" if config.trials > 1 else "episodes",
            "true_env_mpc": rows.get(methods.TrueEnvMPC.name, {}).get("reward")}


def run_pipeline(env_name: str | None, dataset: str, config: RunConfig, *, preset: str,
                 seed: int, out_dir: str, data_dir: str, force: bool = False,
                 skip: Sequence[str] = (), loader_options: dict | None = None) -> dict:
    """Runs every stage and returns the results dict (also `results.json`).
    `loader_options` say how to read the user's long-format file
    (`LOADER_DEFAULTS`)."""
    from experiments import report

    total_start = time.time()
    env = envs.make(env_name) if env_name is not None else None
    own_data = dataset not in datasets.DATASETS
    transitions, metadata, name, dataset_seconds = dataset_stage(env_name, dataset, config,
                                                                  seed, data_dir, loader_options)
    chosen = methods_for(env, config)      # before any output: a bad --methods leaves none
    everything = transitions
    if own_data:
        # The models learn each agent's first 80 %; the last 20 % is its
        # future, on which the personalisation report scores them.
        train_index, held_out = data.time_ordered_split(transitions,
                                                        personalisation.HELD_OUT_FRACTION)
        transitions = transitions.select(train_index)
    run = Run(os.path.join(out_dir, env_name or "custom", name), force)
    os.makedirs(run.directory, exist_ok=True)
    run.timing["dataset"] = round(dataset_seconds, 2)
    if metadata.get("generation_seconds") is not None and not metadata.get("cached", True):
        run.timing["dataset_generation"] = metadata["generation_seconds"]
    dataset_key = dataset_identity(metadata)
    covariates, agent_ids = (test_agents_of(env, transitions) if env is not None
                             else (None, None))
    # What each method's evaluation depends on: its own training only, so
    # that adding a method to a finished run redoes nothing of the others.
    train_keys = {m.name: {"dataset": dataset_key, "trials": config.trials, "seed": seed,
                           "method": m.description()} for m in chosen}
    trained, train_seconds = {}, {}
    for method in chosen:
        trained[method.name], train_seconds[method.name] = train_stage(
            run, method, transitions, config.trials, seed, digest(dataset_key), agent_ids)
    simulators = trained[methods.PerSim.name]
    rows, planner = {}, None
    if env is not None and agent_ids is not None:
        rows, planner = _evaluate(run, env, chosen, trained, covariates, agent_ids, config,
                                  seed, train_keys, skip)
        for name, row in rows.items():
            row["train_seconds"] = train_seconds[name]
    validation = None
    if own_data:
        validation = personalisation_stage(run, config, everything, transitions, held_out,
                                           trained, seed, digest(dataset_key))
        transitions = everything

    factors_stage(run, simulators, transitions)
    figures_written: list[str] = []
    if "plots" not in skip:
        start = time.time()
        with run.stage("plots", "t-SNE of the agent factors, predicted vs true trajectories"):
            figures_written = plots_stage(run, env, simulators, transitions, covariates,
                                          agent_ids, seed)
        run.timing["plots"] = round(time.time() - start, 2)

    reward = _reward_summary(rows, planner, config, env)
    stats = metadata.get("stats")
    config_record = {**_config_record(config), "methods": [m.name for m in chosen],
                     "rank_used": simulators[0].rank,
                     "planner": reward["planner"] if reward else None}
    if own_data and env is None:
        config_record = own_data_settings(config_record, transitions)
    results = {
        "env": env_name,
        "dataset": dataset if dataset in datasets.DATASETS else metadata["path"],
        "preset": preset,
        "seed": seed,
        "test_agents": None if covariates is None else covariates.tolist(),
        "covariate_names": list(env.covariate_names) if env is not None else None,
        "prediction": rows.get(methods.PerSim.name, {}).get("prediction"),
        "reward": reward,
        "methods": rows,
        "dataset_stats": None if not stats else {
            "test_agent_return": stats["test_agent_return"],
            "mean_return": stats["mean_return"], "mean_length": stats["mean_length"]},
        "validation": validation,
        "config": config_record,
        "figures": figures_written,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }
    if own_data:
        results["data"] = own_data_description(transitions, metadata)
    run.timing["total"] = round(time.time() - total_start, 2)
    results["timing_s"] = dict(run.timing)
    write_json(run.path("results.json"), results)
    report.write_report(results, run.path("report.md"))
    _say(f"[report] {run.path('results.json')}, {run.path('report.md')} "
         f"({run.timing['total']:.0f} s in all)")
    return results


def show_progress() -> None:
    """Our progress lines at INFO; the libraries' INFO lines (orbax logs every
    checkpoint) hidden unless --verbosity is given."""
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.INFO)
        import persim_jax

        ours = tuple(os.path.dirname(os.path.abspath(module.__file__)) + os.sep
                     for module in (persim_jax, envs, paper))
        # Python's level numbers: absl's logging.WARNING is on its own scale (-1).
        logging.get_absl_handler().addFilter(
            lambda record: (record.levelno >= std_logging.WARNING
                            or os.path.abspath(record.pathname).startswith(ours)))


def main(argv):
    show_progress()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        unknown = sorted(set(FLAGS.skip) - {"prediction", "reward", "plots"})
        if unknown:
            raise UserError(f"--skip: unknown stage(s) {unknown}; valid: prediction, reward, plots")
        config = settings_from_flags()
        results = run_pipeline(FLAGS.env, FLAGS.dataset, config, preset=FLAGS.preset,
                               seed=FLAGS.seed, out_dir=FLAGS.out_dir, data_dir=FLAGS.data_dir,
                               force=FLAGS.force, skip=tuple(FLAGS.skip),
                               loader_options=loader_options_from_flags())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(open(os.path.join(FLAGS.out_dir, results["env"] or "custom",
                            _run_name(FLAGS.dataset), "report.md")).read())
    return 0


def _run_name(dataset: str) -> str:
    return dataset if dataset in datasets.DATASETS else os.path.splitext(
        os.path.basename(dataset))[0]


if __name__ == "__main__":
    define_flags()
    app.run(main)
