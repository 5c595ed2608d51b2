"""The stages a run takes each compared method through: train (per trial),
prediction error, reward; and the run's own outputs (agent factors, figures).

Each stage is cached in the run's `RunDirectory` under a key that holds what
its result depends on, so a re-run redoes only what changed, and adding a
method to a finished run trains and evaluates just that method.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time

import numpy as np
from absl import logging

from experiments import paper
from experiments.cache import RunDirectory, digest, say, warn_damaged
from experiments.datagen import policies
from persim_jax import data, evaluation, methods, planning
from persim_jax.persim.simulator import Simulator


def floats(values) -> list[float]:
    """`values` flattened to Python floats (for JSON)."""
    return [float(x) for x in np.asarray(values, np.float64).ravel()]


def planner_for(env, config):
    """The run's planner for `env` (`RunConfig.planner_config`), with the
    env's known reward and termination."""
    return planning.make_planner(config.planner_config(env), env)


def planner_description(planner) -> dict:
    """What results.json records of a planner: its kind and config fields."""
    return {"kind": type(planner.config).__name__, **dataclasses.asdict(planner.config)}


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


# ---------------------------------------------------------------------------
# Training


def artefact_name(method: methods.Method, trial: int) -> str:
    """The file a trained method is saved to in the run directory."""
    # PerSim's file name predates the other methods.
    prefix = "simulator" if method.name == methods.PerSim.name else method.name
    return f"{prefix}_trial{trial}.msgpack"


def train_record(trained) -> dict:
    """What the train stage records of a trained model."""
    if isinstance(trained, Simulator):
        return {"rank": trained.rank, "validation_loss": floats(trained.validation_loss),
                "rank_losses": trained.rank_losses}
    return {}


def _reuse(run: RunDirectory, method: methods.Method, stage: str, key: str, path: str):
    """The stored trained model of `stage` if its record and file are sound, else None."""
    if run.cached(stage, key) is None or not os.path.exists(path):
        return None
    try:
        return method.load(path)
    except (ValueError, OSError, KeyError, TypeError) as error:
        warn_damaged(path, f"{method.name} model", error)
        return None


def train_stage(run: RunDirectory, method: methods.Method, transitions, trials: int, seed: int,
                dataset_key: str, agent_ids) -> tuple[list, float]:
    """Trains (or reloads) `method` once per trial: (what it trained, one per
    trial, and the training seconds, stored ones for reused trials). A method
    that does not train gives ([None], 0): one evaluation, no trials."""
    if not isinstance(method, methods.Trains):
        return [None], 0.0
    trained, seconds = [], 0.0
    agents = None if agent_ids is None else [int(a) for a in agent_ids]
    for trial in range(trials):
        key = digest({"dataset": dataset_key, "train": method.training_description(),
                      "seed": seed + trial, "method": method.name, "agents": agents})
        stage = f"train_{method.name}_trial{trial}"
        path = run.path(artefact_name(method, trial))
        reused = _reuse(run, method, stage, key, path)
        if reused is not None:
            trained.append(reused)
            seconds += run.timing.get(stage, 0.0)
            say(f"[train] trial {trial}: reusing {path}")
            continue
        start = time.time()
        say(f"[train] trial {trial}: {method.name}, {transitions.num_transitions} transitions, "
            f"{method.description()}")
        result = method.train(transitions, method.key("train", seed, trial),
                              workdir=run.path("checkpoints", key, f"trial{trial}"),
                              agent_ids=agents)
        method.save(result, path)
        shutil.rmtree(run.path("checkpoints", key), ignore_errors=True)
        with contextlib.suppress(OSError):       # only when no other run's are left
            os.rmdir(run.path("checkpoints"))
        run.store(stage, key, train_record(result), time.time() - start)
        seconds += run.timing[stage]
        trained.append(result)
    run.sum_timings("train")
    return trained, round(seconds, 2)


# ---------------------------------------------------------------------------
# Evaluation


def prediction_stage(run: RunDirectory, env, method: methods.Method, trained: list, covariates,
                     agent_ids, config, seed: int, train_key) -> dict:
    """The paper's open-loop prediction error of `method`, averaged over trials."""
    key = digest({"train": train_key, "method": method.name,
                  "episodes": config.prediction_episodes, "agents": agent_ids.tolist(),
                  "seed": seed})
    stage = f"prediction_{method.name}"
    cached = run.cached(stage, key)
    if cached is not None:
        say("[prediction] reusing the stored result")
        return cached
    start = time.time()
    test_policy = policies.test_policy(env)
    warmup, horizon = paper.PREDICTION_WARMUP, paper.PREDICTION_HORIZON
    summaries, per_episode = [], []
    with run.stage("prediction", f"{method.name}: {len(agent_ids)} agents × "
                   f"{config.prediction_episodes} episodes of the test policy, {warmup} "
                   f"teacher-forced + {horizon} open-loop steps, {len(trained)} trial(s)"):
        for trial, model in enumerate(trained):
            errors = evaluation.prediction_error(
                method.key("prediction", seed, trial),
                method.dynamics_for_agent(model, agent_ids, for_planning=False), env,
                test_policy, covariates, num_episodes=config.prediction_episodes,
                warmup=warmup, horizon=horizon)
            summaries.append(errors.summary())
            per_episode.append(np.asarray(errors.rmse, np.float64))
    result = {
        "rmse": floats(np.mean([s["rmse"] for s in summaries], axis=0)),
        "rmse_std": floats(np.mean([s["rmse_std"] for s in summaries], axis=0)),
        "r2_median": floats(np.mean([s["r2_median"] for s in summaries], axis=0)),
        "horizon": horizon, "warmup": warmup, "episodes": config.prediction_episodes,
        "trials": len(trained),
        # (trials, K, E) each episode's RMSE (None: no state of it scored), so
        # that the claims resample episodes and trials as they do returns.
        "rmse_episodes": [[[None if np.isnan(x) else float(x) for x in agent] for agent in trial]
                          for trial in per_episode],
    }
    return run.store(stage, key, result, time.time() - start)


def method_planner(method: methods.Method, planner, env):
    """(the planner `method` plans with, its description where it is not the
    run's `planner`, else None): a method may plan with its own objective
    (CaDM)."""
    if isinstance(method, methods.ModelBased):
        config_of_method = method.planner_config(planner.config)
        if config_of_method != planner.config:
            own = planning.make_planner(config_of_method, env)
            return own, planner_description(own)
    return planner, None


def planner_key(planner) -> dict:
    """The planner's description without where its candidates run
    (shard_candidates), which does not change the returns
    (tests/test_evaluation.py): recorded, but not part of the reward key."""
    return {k: v for k, v in planner_description(planner).items() if k != "shard_candidates"}


def reward_key(method: methods.Method, env, planner, config, agent_ids, seed: int,
               train_key) -> str:
    """The reward stage's cache key of `method` planning with `planner` (its
    own, `method_planner`): what its returns depend on."""
    model_based = isinstance(method, methods.ModelBased)
    trains = isinstance(method, methods.Trains)
    return digest({"train": train_key if trains else None, "method": method.name,
                   "planner": planner_key(planner) if model_based else None,
                   "episodes": config.episodes if model_based else config.policy_episodes,
                   "max_steps": config.max_steps, "agents": np.asarray(agent_ids).tolist(),
                   "seed": seed, **(method.reward_key(env) if model_based else {})})


def reward_stage(run: RunDirectory, env, method: methods.Method, trained: list, covariates,
                 agent_ids, planner, config, seed: int, train_key) -> dict:
    """Returns of `method` on the test agents: {mean, std, returns (trials,
    K, E)}, the std over trials (several) or over one trial's episodes."""
    model_based = isinstance(method, methods.ModelBased)
    planner, own = method_planner(method, planner, env)
    episodes = config.episodes if model_based else config.policy_episodes
    key = reward_key(method, env, planner, config, agent_ids, seed, train_key)
    stage = f"reward_{method.name}"
    cached = run.cached(stage, key)
    if cached is not None:
        say("[reward] reusing the stored result")
        return cached
    start = time.time()
    steps = config.max_steps or env.max_episode_steps
    with run.stage("reward", f"{method.name} {'MPC' if model_based else 'policy'}: "
                   f"{len(agent_ids)} agents × {episodes} episodes × {len(trained)} trial(s), "
                   f"≤ {steps} steps, one compiled program each"):
        per_trial = np.stack([
            episode_returns(method, model, method.key("reward", seed, trial), planner, env,
                            covariates, agent_ids, episodes, config.max_steps)
            for trial, model in enumerate(trained)])                # (trials, K, E)
    means = per_trial.mean(axis=2)                                     # (trials, K)
    spread = means.std(axis=0) if len(trained) > 1 else per_trial[0].std(axis=1)
    result = {"mean": floats(means.mean(axis=0)), "std": floats(spread),
              "returns": per_trial.tolist()}
    if own is not None:
        result["planner"] = own
    return run.store(stage, key, result, time.time() - start)


def episode_returns(method: methods.Method, trained, key, planner, env, covariates, agent_ids,
                    episodes: int, max_steps: int | None) -> np.ndarray:
    """(K, E) returns: MPC on a model-based method's dynamics, or the
    model-free method's own policies."""
    if isinstance(method, methods.ModelBased):
        return evaluation.run_episodes(key, planner, method.dynamics_for_agent(trained, agent_ids),
                                       env, covariates, episodes, max_steps=max_steps)
    return evaluation.run_policy_episodes(key, method.policy_for_agent(trained, agent_ids), env,
                                          covariates, episodes, max_steps=max_steps)


def evaluate_methods(run: RunDirectory, env, chosen, trained, covariates, agent_ids, config,
                     seed, train_keys, skip) -> tuple[dict, dict | None]:
    """({method: {"prediction": ... or None, "reward": ... or None}}, the
    planner's description or None without the reward stage)."""
    planner = planner_for(env, config) if "reward" not in skip else None
    rows = {}
    for method in chosen:
        prediction = reward = None
        models, key = trained[method.name], train_keys[method.name]
        scored = isinstance(method, methods.ModelBased) and method.predicts
        if scored and "prediction" not in skip:
            prediction = prediction_stage(run, env, method, models, covariates, agent_ids,
                                          config, seed, key)
        if "reward" not in skip:
            reward = reward_stage(run, env, method, models, covariates, agent_ids, planner,
                                  config, seed, key)
        rows[method.name] = {"prediction": prediction, "reward": reward}
    run.sum_timings("prediction")
    run.sum_timings("reward")
    return rows, None if planner is None else planner_description(planner)


# ---------------------------------------------------------------------------
# The run's own outputs


def factors_stage(run: RunDirectory, simulators, transitions) -> None:
    """`agent_factors.npz`: factors (M, N, r) of trial 0 and the covariates."""
    simulator = simulators[0]
    arrays = {"factors": np.asarray(simulator.agent_factors(member=None))}
    if transitions.covariates is not None:
        arrays["covariates"] = np.asarray(transitions.covariates)
    if transitions.agent_keys is not None:
        arrays["agent_keys"] = np.asarray([str(k) for k in transitions.agent_keys])
    with data.atomic_write(run.path("agent_factors.npz")) as handle:
        np.savez(handle, **arrays)


def covariate_names(env, transitions) -> list[str]:
    """The covariates' names: the env's, the file's columns, or covariate_<i>."""
    if env is not None:
        return list(env.covariate_names)
    if transitions.covariate_names is not None:
        return list(transitions.covariate_names)
    return [f"covariate_{i}" for i in range(np.asarray(transitions.covariates).shape[1])]


def plots_stage(run: RunDirectory, env, simulators, transitions, covariates, agent_ids,
                seed) -> list[str]:
    """t-SNE of the agent factors (coloured by each covariate when there are
    some) and, with an env, predicted vs true trajectories of two test agents;
    the figures' file names."""
    from experiments import figures

    written = []
    factors = np.asarray(simulators[0].agent_factors(member=0))
    labels = ([str(k) for k in transitions.agent_keys]
              if transitions.agent_keys is not None else None)
    if transitions.covariates is not None and transitions.num_agents >= 3:
        written += figures.plot_tsne(factors, np.asarray(transitions.covariates),
                                     covariate_names(env, transitions), run.path("tsne"),
                                     labels=labels)
    elif env is None and transitions.num_agents >= 3:
        # Own data without covariates: the factors alone (the report says how
        # to add covariates).
        written.append(figures.plot_tsne_factors(factors, run.path("tsne_factors.png"),
                                                 labels=labels))
    if env is not None and agent_ids is not None:
        trajectories = evaluation.prediction_trajectories(
            methods.stage_key("plots", seed), simulators[0], env, policies.test_policy(env),
            covariates[:2], agent_ids[:2])
        names = [", ".join(f"{n} {v:g}" for n, v in zip(env.covariate_names, c))
                 for c in covariates[:2]]
        path = run.path("trajectories.png")
        figures.plot_trajectories(trajectories["true"], trajectories["predicted"],
                                  trajectories["valid"], path, names,
                                  members=trajectories.get("members"))
        written.append(path)
    return [os.path.basename(p) for p in written]


def plots(run: RunDirectory, env, simulators, transitions, covariates, agent_ids, seed,
          skip) -> list[str]:
    """The plots stage, timed (none when skipped)."""
    if "plots" in skip:
        return []
    start = time.time()
    with run.stage("plots", "t-SNE of the agent factors, predicted vs true trajectories"):
        written = plots_stage(run, env, simulators, transitions, covariates, agent_ids, seed)
    run.timing["plots"] = round(time.time() - start, 2)
    return written

