"""The pipeline of one run, env × dataset: dataset → train every compared
method → prediction error and reward on the test agents → factors, figures →
`results.json` and `report.md`.

    results = pipeline.run_pipeline("cartpole", "pure", config, preset="quick", seed=0,
                                    out_dir="runs", data_dir="data")

The user's own file takes the same stages with its own ends
(`experiments.own_data`): the time-ordered hold-out before training, the
personalisation stage after it, and the test agents' evaluation only when an
env is given and units 0..4 are inside its ranges.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Sequence

import jax
import numpy as np

import envs
from experiments import decisions, own_data
from experiments.cache import RunDirectory, digest, say
from experiments.config import RunConfig, UserError
from experiments.datagen import datasets
from experiments.stages import (evaluate_methods, factors_stage, plots, test_agents_of,
                                train_stage)
from persim_jax import data, methods


def methods_for(env, config: RunConfig) -> list[methods.Method]:
    """The methods a run compares (`RunConfig.method_names`), each built from
    its own settings (`RunConfig.method_settings`); without an env (own data,
    no test agents), PerSim only."""
    names = config.method_names(tuple(methods.REGISTRY))
    if env is None:
        if set(names) - {"persim", "true_env_mpc"}:
            raise UserError("--methods: comparing methods needs --env (the test agents' "
                            "true physics); own data without an env trains PerSim only")
        names = ("persim",)
    training = config.training()
    built = []
    for name in names:
        try:
            built.append(methods.REGISTRY[name].from_settings(
                config.method_settings.get(name, {}), env=env, training=training))
        except ValueError as error:
            raise UserError(f"{name} settings: {error}") from None
    return built


def is_paper_dataset(dataset: str) -> bool:
    """Whether `dataset` names one of the paper's datasets (else a user's file)."""
    return dataset in datasets.DATASETS


def run_name(dataset: str) -> str:
    """The run directory's name: the paper dataset's, or the user's file's stem."""
    return dataset if is_paper_dataset(dataset) else own_data.run_name(dataset)


def load_dataset(env_name: str | None, dataset: str, config: RunConfig, seed: int,
                 data_dir: str, loader_options: dict | None = None):
    """(Transitions, metadata, name): the paper's dataset (cached) or the
    user's file, read with `loader_options` (`own_data.LOADER_DEFAULTS`' keys)."""
    if is_paper_dataset(dataset):
        transitions, metadata = datasets.load_or_generate(
            env_name, dataset, data_dir=data_dir, seed=seed, num_agents=config.num_agents)
        return transitions, metadata, dataset
    if (not os.path.isfile(dataset) and os.sep not in dataset and "." not in dataset
            and not dataset.startswith("minari:")):
        raise UserError(f"--dataset: {dataset!r} is neither one of "
                        f"{', '.join(datasets.DATASETS)}, a file nor minari:<id>")
    transitions, metadata = own_data.load(dataset, env_name, loader_options)
    return transitions, metadata, own_data.run_name(dataset)


def dataset_identity(metadata: dict) -> dict:
    """What trained models depend on in a dataset, for the stage keys: the
    file's contents and how it was read (the user's file), or the generation
    request (the paper's datasets, which our code regenerates bit for bit on
    one software stack and one kind of CPU, the sidecar's `libraries` and `cpu`);
    never where it lies, so that moving a data folder retrains nothing."""
    identity = {k: metadata.get(k) for k in ("sha256", "version", "env", "dataset", "seed",
                                             "num_agents", "policies_sha256")}
    if metadata.get("loader") is not None:
        identity["loader"] = metadata["loader"]
    return identity


def dataset_stage(env_name, dataset, config: RunConfig, seed: int, data_dir: str,
                  loader_options: dict | None = None):
    """(transitions, metadata, name, seconds), with progress lines."""
    start = time.time()
    what = (f"{dataset}: {config.num_agents} agents, one trajectory each"
            if is_paper_dataset(dataset) else f"loading {dataset}")
    say(f"[dataset] {what}")
    transitions, metadata, name = load_dataset(env_name, dataset, config, seed, data_dir,
                                               loader_options)
    seconds = time.time() - start
    how = ("read" if metadata.get("read") else
           "cached" if metadata.get("cached", True) else "generated")
    say(f"[dataset] {transitions.num_agents} agents, {transitions.num_transitions} transitions "
        f"({how}, {seconds:.1f} s)")
    if metadata.get("read"):
        say(f"[dataset] {own_data.summary_line(transitions)}")
    if metadata.get("stats"):
        say(datasets.format_stats(metadata))
    return transitions, metadata, name, seconds


def config_record(config: RunConfig) -> dict:
    """`dataclasses.asdict(config)` as JSON has it (tuples as lists)."""
    return data.jsonable(dataclasses.asdict(config))


def reward_summary(rows: dict, planner: dict | None, config: RunConfig, env) -> dict | None:
    """results.json's "reward": PerSim's and True env + MPC's rows, as before
    the methods protocol (`results["methods"]` has every method's)."""
    if planner is None:
        return None
    return {"episodes": config.episodes, "trials": config.trials,
            "max_steps": config.max_steps or env.max_episode_steps, "planner": planner,
            "persim": rows[methods.PerSim.name]["reward"],
            "std_over": "trials" if config.trials > 1 else "episodes",
            "true_env_mpc": rows.get(methods.TrueEnvMPC.name, {}).get("reward")}


@dataclasses.dataclass
class Trained:
    """The run's trained methods: {name: [one per trial]}, training seconds
    per method, and each method's evaluation key (its own training only, so
    that adding a method to a finished run redoes nothing of the others)."""

    models: dict
    seconds: dict
    keys: dict


def train_methods(run: RunDirectory, chosen, transitions, config: RunConfig, seed: int,
                  dataset_key: dict, agent_ids) -> Trained:
    """Every chosen method trained (or reloaded) once per trial."""
    keys = {m.name: {"dataset": dataset_key, "trials": config.trials, "seed": seed,
                     "method": m.description()} for m in chosen}
    models, seconds = {}, {}
    for method in chosen:
        models[method.name], seconds[method.name] = train_stage(
            run, method, transitions, config.trials, seed, digest(dataset_key), agent_ids)
    return Trained(models, seconds, keys)


def results_record(*, env_name, env, dataset, preset, seed, covariates, rows, reward, metadata,
                   validation, config, chosen, simulators, figures) -> dict:
    """results.json (docs/design.md lists its keys)."""
    stats = metadata.get("stats")
    settings = {**config_record(config), "methods": [m.name for m in chosen],
                "rank_used": simulators[0].rank,
                "planner": reward["planner"] if reward else None}
    return {
        "env": env_name,
        "dataset": dataset if is_paper_dataset(dataset) else metadata["path"],
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
        "config": settings,
        "figures": figures,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "libraries": datasets.library_versions(),
        "cpu": datasets.host_cpu(),
    }


def _open_run(env_name, dataset, config, seed, out_dir, data_dir, force, loader_options,
              check=None):
    """(env, transitions, metadata, run, chosen methods) at a run's start;
    `check(env, transitions)` runs before any output (a UserError leaves none)."""
    env = envs.make(env_name) if env_name is not None else None
    transitions, metadata, name, dataset_seconds = dataset_stage(env_name, dataset, config,
                                                                 seed, data_dir, loader_options)
    chosen = methods_for(env, config)      # before any output: a bad --methods leaves none
    if check is not None:
        check(env, transitions)
    run = RunDirectory(os.path.join(out_dir, env_name or "custom", name), force)
    os.makedirs(run.directory, exist_ok=True)
    run.timing["dataset"] = round(dataset_seconds, 2)
    if metadata.get("generation_seconds") is not None and not metadata.get("cached", True):
        run.timing["dataset_generation"] = metadata["generation_seconds"]
    return env, transitions, metadata, run, chosen


def run_pipeline(env_name: str | None, dataset: str, config: RunConfig, *, preset: str,
                 seed: int, out_dir: str, data_dir: str, force: bool = False,
                 skip: Sequence[str] = (), loader_options: dict | None = None,
                 decide: decisions.DecisionRequest | None = None) -> dict:
    """Runs every stage and returns the results dict (also `results.json`):
    the paper's pipeline for its datasets, the own-data pipeline for a file.
    `loader_options` say how to read the user's long-format file
    (`own_data.LOADER_DEFAULTS`); `decide` asks for decisions on it."""
    if is_paper_dataset(dataset):
        if decide is not None:
            raise UserError("--decide: decisions are made on your own data (--dataset=FILE); "
                            "export a paper dataset with data.save_csv to decide on it")
        return paper_pipeline(env_name, dataset, config, preset=preset, seed=seed,
                              out_dir=out_dir, data_dir=data_dir, force=force, skip=skip)
    return own_data_pipeline(env_name, dataset, config, preset=preset, seed=seed,
                             out_dir=out_dir, data_dir=data_dir, force=force, skip=skip,
                             loader_options=loader_options, decide=decide)


def _evaluate(run, env, chosen, trained: Trained, covariates, agent_ids, config, seed, skip):
    """(rows, planner description): the test agents' prediction error and
    reward, when there is an env and units 0..4 are its agents."""
    if env is None or agent_ids is None:
        return {}, None
    rows, planner = evaluate_methods(run, env, chosen, trained.models, covariates, agent_ids,
                                     config, seed, trained.keys, skip)
    for name, row in rows.items():
        row["train_seconds"] = trained.seconds[name]
    return rows, planner


def _results(run, env_name, env, dataset, preset, seed, config, chosen, trained: Trained,
             transitions, covariates, agent_ids, rows, planner, metadata, validation, skip):
    """The run's own outputs (agent factors, figures) and its results record."""
    simulators = trained.models[methods.PerSim.name]
    factors_stage(run, simulators, transitions)
    written = plots(run, env, simulators, transitions, covariates, agent_ids, seed, skip)
    return results_record(
        env_name=env_name, env=env, dataset=dataset, preset=preset, seed=seed,
        covariates=covariates, rows=rows, reward=reward_summary(rows, planner, config, env),
        metadata=metadata, validation=validation, config=config, chosen=chosen,
        simulators=simulators, figures=written)


def paper_pipeline(env_name: str, dataset: str, config: RunConfig, *, preset: str, seed: int,
                   out_dir: str, data_dir: str, force: bool = False, skip: Sequence[str] = (),
                   loader_options: dict | None = None) -> dict:
    """The paper's protocol on one of its datasets: every method trained on
    all the transitions, scored on the 5 test agents."""
    total_start = time.time()
    env, transitions, metadata, run, chosen = _open_run(env_name, dataset, config, seed, out_dir,
                                                        data_dir, force, loader_options)
    dataset_key = dataset_identity(metadata)
    covariates, agent_ids = test_agents_of(env, transitions)
    trained = train_methods(run, chosen, transitions, config, seed, dataset_key, agent_ids)
    rows, planner = _evaluate(run, env, chosen, trained, covariates, agent_ids, config, seed,
                              skip)
    results = _results(run, env_name, env, dataset, preset, seed, config, chosen, trained,
                       transitions, covariates, agent_ids, rows, planner, metadata, None, skip)
    return write_outputs(run, results, total_start)


def own_data_pipeline(env_name: str | None, dataset: str, config: RunConfig, *, preset: str,
                      seed: int, out_dir: str, data_dir: str, force: bool = False,
                      skip: Sequence[str] = (), loader_options: dict | None = None,
                      decide: decisions.DecisionRequest | None = None) -> dict:
    """The user's file: the methods learn each agent's first 80 %, the
    personalisation stage scores them on the last 20 %; with an env whose
    agents units 0..4 are, the paper's evaluation of those agents too; with
    `decide`, a plan and each policy's value per agent
    (`experiments.decisions`)."""
    total_start = time.time()
    prepared = []        # the decision request, checked before any output
    check = None if decide is None else (
        lambda env, everything: prepared.append(decisions.prepare(decide, env, everything)))
    env, everything, metadata, run, chosen = _open_run(env_name, dataset, config, seed, out_dir,
                                                       data_dir, force, loader_options, check)
    transitions, held_out = own_data.split(everything)
    dataset_key = dataset_identity(metadata)
    covariates, agent_ids = (test_agents_of(env, transitions) if env is not None
                             else (None, None))
    trained = train_methods(run, chosen, transitions, config, seed, dataset_key, agent_ids)
    rows, planner = _evaluate(run, env, chosen, trained, covariates, agent_ids, config, seed,
                              skip)
    population = own_data.population_models(run, config, transitions, trained.models, seed,
                                            digest(dataset_key))
    validation = own_data.personalisation_stage(run, config, everything, transitions, held_out,
                                                trained.models, population)
    results = _results(run, env_name, env, dataset, preset, seed, config, chosen, trained,
                       everything, covariates, agent_ids, rows, planner, metadata, validation,
                       skip)
    if env is None:
        results["config"] = own_data.settings(results["config"], everything)
    results["data"] = own_data.description(everything, metadata)
    if prepared:
        results.update(decisions.decide(prepared[0], config, env, everything, transitions,
                                        everything.select(held_out),
                                        trained.models[methods.PerSim.name][0], population[0],
                                        seed))
    return write_outputs(run, results, total_start)


def write_outputs(run: RunDirectory, results: dict, total_start: float) -> dict:
    """Writes `results.json` (with the stage timings) and `report.md`."""
    from experiments import report

    run.timing["total"] = round(time.time() - total_start, 2)
    results["timing_s"] = dict(run.timing)
    data.write_json(run.path("results.json"), results)
    report.write_report(results, run.path("report.md"))
    say(f"[report] {run.path('results.json')}, {run.path('report.md')} "
        f"({run.timing['total']:.0f} s in all)")
    return results
