"""The paper's scale on one device: one command that states what it will
cost, then runs the paper preset's cells resumably and records their timings.

    python -m experiments.paper_scale --envs=halfcheetah             # the paper's HalfCheetah
    python -m experiments.paper_scale --envs=halfcheetah --cost_only # the cost report alone
    python -m experiments.paper_scale --envs=halfcheetah --dry_run   # tiny, any CPU, a temp folder

Before anything runs, the cost report (`<out_dir>/paper/cost_report.json`,
printed as a table) lists per env and stage, for the preset's settings:

  * the count of work: env steps, optimiser steps (transitions × epochs),
    BCQ iterations, MPC plans, prediction steps;
  * the stage's compiled program at its real size, lowered and compiled on
    the device that will run it (never executed): XLA's memory per device
    (`memory_analysis`: arguments, outputs, temporaries);
  * FLOPs: XLA's `cost_analysis` of the same program with every loop cut to
    one trip (XLA counts a loop body once, whatever its trip count), times
    the trip counts (MJX's constraint solver, a loop of unknown trips inside
    the true env's step, is counted once per step);
  * the expected seconds: that program run at a shortened size on this
    device (best of 2 timed calls after a compiling one), times the work.

Stages without a program of their own borrow the rate of one that has the
same network (population and per-agent training: PerSim's step; their MPC:
PerSim's plans), and say so; stages not estimated (prediction, CaDM, the
model-free episodes, plots) say so too. On a GPU the same code reports the
GPU's memory, FLOPs and seconds.

Then each env × dataset cell runs as `experiments.reproduce` runs it (one
`python -m experiments.run --preset=paper` process per cell): a recorded cell
is skipped, an interrupted one resumes through its stage cache and training
checkpoints. After every cell `<out_dir>/paper/timings.json` is rewritten:
each cell's measured seconds per stage beside the report's expectation.
Rerunning the command resumes: the cost report is reused while its request
and device are unchanged.

`--dry_run` runs the same code at a tiny size (`DRY_RUN`: 6 agents, 1 trial,
1 epoch, one 3-step episode, an 8-candidate planner, 2 BCQ iterations) in a
temporary folder (or `--out_dir`), so that the whole command is proven on a
CPU.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import glob
import json
import math
import os
import tempfile
import time

if __name__ == "__main__":
    # One JAX CPU device per core, as experiments.run (before JAX starts).
    from persim_jax import runtime
    runtime.use_cpu_cores()

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import envs
from experiments import cli, paper, reproduce
from experiments.claims import ALL_ENVS
from experiments.config import RunConfig, UserError, resolve
from experiments.datagen.datasets import DATASETS
from experiments.pipeline import methods_for
from persim_jax import data, methods, planning
from persim_jax.evaluation import episodes as episodes_lib
from persim_jax.methods.bcq import model as bcq_model
from persim_jax.methods.bcq import train as bcq_train
from persim_jax.persim import model as model_lib
from persim_jax.persim import train as train_lib
from persim_jax.persim.simulator import Simulator

FLAGS = flags.FLAGS
PRESET = "paper"
REPORT_FILE = "cost_report.json"
TIMINGS_FILE = "timings.json"

# The dry run's settings: every stage of every method runs, at a size a
# 2-core CPU finishes in seconds (plus compilation).
DRY_RUN = dict(num_agents=6, trials=1, ensemble_size=2, epochs=1, episodes=1, max_steps=3,
               prediction_episodes=1, candidates=8, horizon=3, cem_rounds=1, cem_elites=2,
               policy_episodes=1, bcq_iterations=2, cadm_iterations=1, cadm_pairs_per_epoch=64,
               cadm_particles=5)

# Training steps / BCQ iterations / env steps of the timed calls (their
# programs' loops shortened to these trips; the rate is scaled to the work).
TIMED_STEPS = 20


def define_flags() -> None:
    flags.DEFINE_list("envs", ["halfcheetah"], f"Environments: {', '.join(ALL_ENVS)}.")
    flags.DEFINE_list("datasets", list(DATASETS), "Datasets.")
    flags.DEFINE_list("methods", ["all"], "Methods (experiments.run's --methods).")
    flags.DEFINE_string("out_dir", "runs", "The runs' folder: <out_dir>/paper/ (the cost report "
                        "and timings too).")
    flags.DEFINE_string("data_dir", "data", "Dataset cache.")
    flags.DEFINE_string("record_dir", reproduce.RECORD_DIR, "The record: <record_dir>/paper/.")
    flags.DEFINE_bool("dry_run", False, "The same code at a tiny size (DRY_RUN) in a temporary "
                      "folder (or --out_dir, with the data and record inside it).")
    flags.DEFINE_bool("cost_only", False, "Write the cost report; run nothing.")


# ---------------------------------------------------------------------------
# Compiled programs: memory, FLOPs, seconds


def memory_of(compiled) -> dict | None:
    """XLA's memory per device of a compiled program, in bytes; None where
    the backend does not say."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    fields = {"argument": stats.argument_size_in_bytes, "output": stats.output_size_in_bytes,
              "alias": stats.alias_size_in_bytes, "temp": stats.temp_size_in_bytes,
              "generated_code": stats.generated_code_size_in_bytes}
    fields = {k: int(v) for k, v in fields.items()}
    fields["total"] = (fields["argument"] + fields["output"] - fields["alias"] + fields["temp"]
                       + fields["generated_code"])
    return fields


def flops_of(compiled) -> float | None:
    """XLA's FLOPs of a compiled program (a loop's body counted once)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):          # older jax: one dict per device
        analysis = analysis[0] if analysis else None
    return None if not analysis or "flops" not in analysis else float(analysis["flops"])


def seconds_of(compiled, args) -> float:
    """Best of 2 timed calls of `compiled(*args)` after an untimed one."""
    jax.block_until_ready(compiled(*args))
    best = math.inf
    for _ in range(2):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - start)
    return best


def compile_program(program, args):
    return program.lower(*args).compile()


def say(message: str) -> None:
    print(f"[paper_scale] {message}", flush=True)


def stage_row(*, work: dict, units: float, unit: str, memory, flops_per_unit, seconds_per_unit,
              program: str, basis: str = "measured") -> dict:
    """One stage of the report: its work, the program measured and the
    expectation (units × per-unit FLOPs / seconds)."""
    return {"work": work, "unit": unit, "units": units, "program": program, "memory": memory,
            "flops_per_unit": flops_per_unit,
            "flops": None if flops_per_unit is None else flops_per_unit * units,
            "seconds_per_unit": seconds_per_unit,
            "expected_seconds": None if seconds_per_unit is None else seconds_per_unit * units,
            "basis": basis}


def borrowed(row: dict, work: dict, units: float, source: str) -> dict:
    """A stage estimated at another stage's per-unit rate (the same network)."""
    return stage_row(work=work, units=units, unit=row["unit"], memory=row["memory"],
                     flops_per_unit=row["flops_per_unit"],
                     seconds_per_unit=row["seconds_per_unit"], program=row["program"],
                     basis=f"rate of {source} (same network)")


def not_estimated(work: dict, why: str) -> dict:
    return {"work": work, "unit": None, "units": None, "program": None, "memory": None,
            "flops_per_unit": None, "flops": None, "seconds_per_unit": None,
            "expected_seconds": None, "basis": f"not estimated: {why}"}


# ---------------------------------------------------------------------------
# The stages' programs


def _model_config(env, config: RunConfig, num_agents: int) -> model_lib.ModelConfig:
    training = config.training()
    return model_lib.ModelConfig(
        num_agents=num_agents, obs_dim=env.obs_dim, rank=max(training.ranks),
        num_actions=env.num_actions if env.discrete_actions else None,
        action_dim=None if env.discrete_actions else env.action_dim,
        state_hidden=config.state_hidden, action_hidden=config.action_hidden)


def _train_batch(model_config: model_lib.ModelConfig, rows: int) -> train_lib.Batch:
    """Zeros of a training batch's shapes (the cost does not depend on values)."""
    action = (jnp.zeros((rows,), jnp.int32) if model_config.discrete
              else jnp.zeros((rows, model_config.action_dim), jnp.float32))
    return train_lib.Batch(agent_id=jnp.zeros((rows,), jnp.int32),
                           obs=jnp.zeros((rows, model_config.obs_dim), jnp.float32),
                           action=action,
                           target=jnp.zeros((rows, model_config.obs_dim), jnp.float32),
                           weight=jnp.ones((rows,), jnp.float32))


def train_cost(env, config: RunConfig, transitions: int) -> dict:
    """PerSim's training: trials × epochs × steps of M members, each step a
    minibatch; the epoch program of `persim.train.fit` measured."""
    training = config.training()
    model_config = _model_config(env, config, config.num_agents)
    num_validation = int(round(training.validation_fraction * transitions))
    num_train = transitions - num_validation
    batch = min(training.batch_size, num_train)
    steps = num_train // batch

    def epoch_args(rows: int, validation_rows: int):
        optimizer = train_lib.make_optimizer(training.learning_rate,
                                             training.lr_halving_epochs, rows // batch)
        state = train_lib.init_train_state(jax.random.PRNGKey(0), model_config,
                                           training.ensemble_size, optimizer)
        validation = train_lib.chunk_batch(
            _train_batch(model_config, validation_rows),
            min(train_lib.VALIDATION_CHUNK, validation_rows))
        return (state, _train_batch(model_config, rows), validation, jax.random.PRNGKey(1))

    def epoch(rows: int, has_validation: bool):
        return train_lib.make_epoch_fn(model_config, training.learning_rate, batch, rows,
                                       has_validation, training.lr_halving_epochs)

    full_args = epoch_args(num_train, max(num_validation, 1))
    full = compile_program(epoch(num_train, num_validation > 0), full_args)
    one = compile_program(epoch(batch, False), epoch_args(batch, 1))
    # Seconds: the epoch itself when it is short, else one of TIMED_STEPS
    # steps with its share of validation rows.
    timed_steps, timed, timed_args = steps, full, full_args
    if steps > TIMED_STEPS:
        timed_steps = TIMED_STEPS
        rows = timed_steps * batch
        timed_args = epoch_args(rows, max(1, round(rows * num_validation / num_train)))
        timed = compile_program(epoch(rows, num_validation > 0), timed_args)
    units = config.trials * config.epochs * steps
    return stage_row(
        work={"transitions": transitions, "training_rows": num_train, "epochs": config.epochs,
              "trials": config.trials, "members": training.ensemble_size,
              "batch_size": batch, "steps_per_epoch": steps},
        units=units, unit="optimiser step of the M members", memory=memory_of(full),
        flops_per_unit=flops_of(one), seconds_per_unit=seconds_of(timed, timed_args) / timed_steps,
        program=f"persim.train.make_epoch_fn at {num_train} rows (validation scoring in the "
                "seconds, not in the FLOPs)")


def random_simulator(env, config: RunConfig) -> Simulator:
    """M members of the run's network with random parameters (the planner's
    cost does not depend on their values)."""
    model_config = _model_config(env, config, config.num_agents)
    keys = jax.random.split(jax.random.PRNGKey(0), config.ensemble_size)
    params = jax.vmap(model_lib.init_params, in_axes=(0, None))(keys, model_config)
    dim = env.obs_dim
    action = ((jnp.zeros((0,)), jnp.ones((0,))) if env.discrete_actions
              else (jnp.zeros((env.action_dim,)), jnp.ones((env.action_dim,))))
    stats = model_lib.NormStats(jnp.zeros((dim,)), jnp.ones((dim,)), jnp.zeros((dim,)),
                                jnp.ones((dim,)), *action)
    return Simulator(params=params, stats=stats,
                     validation_loss=jnp.zeros((config.ensemble_size,)), config=model_config)


def episodes_program(actor_for_agent, env, covariates, num_episodes: int, max_steps: int,
                     chunk_size, devices):
    """(program, args) of `evaluation.run_actor_episodes`' compiled episodes
    (the same program and inputs), for lowering without running."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    values = np.asarray(covariates, np.float32)
    if chunk_size is None and devices[0].platform == "cpu":
        chunk_size = 1
    batch = episodes_lib._episode_batch(jax.random.PRNGKey(0), values, num_episodes,
                                        len(devices))
    arrays, description = episodes_lib.split_static(actor_for_agent)
    program = episodes_lib.compiled_episodes(description, env, int(max_steps), chunk_size,
                                             tuple(devices))
    mesh = Mesh(np.asarray(devices), (episodes_lib.BATCH_AXIS,))
    split = NamedSharding(mesh, PartitionSpec(episodes_lib.BATCH_AXIS))
    replicated = NamedSharding(mesh, PartitionSpec())
    inputs = [episodes_lib._global_array(x, split) for x in batch]
    arrays = [episodes_lib._global_array(np.asarray(x), replicated) for x in arrays]
    return program, (arrays, *inputs)


def one_trip_planner(planner: planning.Planner, env) -> tuple[planning.Planner, int]:
    """(the planner with horizon 1 and one round, horizon × rounds of the real one)."""
    fields = {"horizon": 1}
    trips = planner.config.horizon
    if hasattr(planner.config, "num_rounds"):
        fields["num_rounds"] = 0
        trips *= planner.config.num_rounds + 1
    return planning.make_planner(dataclasses.replace(planner.config, **fields), env), trips


def one_plan(planner, dynamics_for_agent, key, covariates, obs):
    """The action of one plan of agent 0 (its actor as the episodes build it)."""
    actor = episodes_lib.PlannerActor(planner, dynamics_for_agent(0, covariates))
    return actor.act(key, actor.init(key), obs)[0]


def mpc_cost(env, config: RunConfig, method: methods.Method, trained, trials: int) -> dict:
    """MPC episodes of the test agents on `method`'s dynamics: trials × agents
    × episodes × steps plans; the episodes program measured."""
    planner = planning.make_planner(config.planner_config(env), env)
    covariates = env.test_agents
    agent_ids = list(range(len(covariates)))
    dynamics = method.dynamics_for_agent(trained, agent_ids)
    devices = tuple(jax.devices())
    max_steps = config.max_steps or env.max_episode_steps
    episodes = config.episodes
    actor = episodes_lib.PlannerActorForAgent(planner, dynamics)
    full_program, full_args = episodes_program(actor, env, covariates, episodes, max_steps, None,
                                               devices)
    full = compile_program(full_program, full_args)
    # FLOPs: one plan of the first test agent, the planner's loops cut to
    # one trip (XLA's count of the sharded episodes program omits its body).
    small, trips = one_trip_planner(planner, env)
    one = compile_program(jax.jit(functools.partial(one_plan, small, dynamics)),
                          (jax.random.PRNGKey(0), jnp.asarray(covariates[0], jnp.float32),
                           jnp.zeros((env.obs_dim,), jnp.float32)))
    # Seconds: one step of the batch as the run plays it (the whole program
    # when it is as short); on a CPU, where episodes run one at a time, one
    # episode per agent (time is linear in them).
    timed_episodes = episodes if devices[0].platform != "cpu" else 1
    if timed_episodes == episodes and max_steps <= TIMED_STEPS:
        seconds = seconds_of(full, full_args) / max_steps
    else:
        program, args = episodes_program(actor, env, covariates, timed_episodes, 1, None,
                                         devices)
        seconds = seconds_of(compile_program(program, args), args)
    plans = trials * len(agent_ids) * episodes * max_steps
    per_plan = seconds / (len(agent_ids) * timed_episodes)
    flops = flops_of(one)
    return stage_row(
        work={"trials": trials, "agents": len(agent_ids), "episodes": episodes,
              "steps": max_steps, "plans": plans, "planner": stages_description(planner),
              "model_evaluations_per_plan": trips * getattr(
                  planner.config, "num_samples", getattr(planner.config, "num_candidates", 1))},
        units=plans, unit="plan (and env step)", memory=memory_of(full),
        flops_per_unit=None if flops is None else flops * trips, seconds_per_unit=per_plan,
        program=f"evaluation.run_episodes' program, {len(agent_ids)} agents × {episodes} "
                f"episodes × {max_steps} steps on {len(devices)} device(s)")


def stages_description(planner) -> dict:
    return {"kind": type(planner.config).__name__,
            **{k: v for k, v in dataclasses.asdict(planner.config).items()
               if k in ("num_samples", "num_candidates", "horizon", "num_rounds", "num_elites")}}


def synthetic_transitions(env, num_agents: int, steps: int) -> data.Transitions:
    """`steps` zero transitions of each agent, of the env's shapes."""
    rows = num_agents * steps
    obs = np.zeros((rows, env.obs_dim), np.float32)
    action = (np.zeros((rows,), np.int32) if env.discrete_actions
              else np.zeros((rows, env.action_dim), np.float32))
    return data.make_transitions(obs, action, obs, np.repeat(np.arange(num_agents), steps),
                                 reward=np.zeros((rows,), np.float32),
                                 num_actions=env.num_actions if env.discrete_actions else None)


def bcq_cost(env, config: RunConfig, method: methods.Method, transitions: int,
             steps_per_agent: int) -> dict:
    """BCQ's training: trials × iterations of its K policies (BCQ-P 1, BCQ-A
    one per test agent); the chunk program of `bcq.fit` measured."""
    bcq_config = method.config.resolved(env.discrete_actions)
    agent_ids = list(range(5)) if method.name == "bcq_a" else None
    agents = 5 if agent_ids else config.num_agents
    policy_data = bcq_train.policy_data(synthetic_transitions(env, agents, steps_per_agent),
                                        agent_ids)
    count = int(policy_data.count.shape[0])
    keys = jax.random.split(jax.random.PRNGKey(0), count)
    sizes = bcq_model.BCQConfig(q_hidden=bcq_config.q_hidden, vae_hidden=bcq_config.vae_hidden,
                                actor_hidden=bcq_config.actor_hidden,
                                critic_hidden=bcq_config.critic_hidden)
    state = bcq_train._init_states(keys, sizes, env.discrete_actions, env.obs_dim,
                                   env.num_actions if env.discrete_actions else env.action_dim)
    program_config = bcq_train._program_config(bcq_config)

    def chunk(length):
        return bcq_train.make_chunk_fn(program_config, env.discrete_actions, length)

    args = (state, policy_data, keys, 0)
    iterations = bcq_config.iterations
    full = compile_program(chunk(min(bcq_train.CHUNK_ITERATIONS, iterations)), args)
    one = compile_program(chunk(1), args)
    timed_iterations = min(iterations, TIMED_STEPS)
    seconds = seconds_of(compile_program(chunk(timed_iterations), args), args)
    return stage_row(
        work={"iterations": iterations, "policies": count, "trials": config.trials,
              "batch_size": bcq_config.batch_size},
        units=config.trials * iterations, unit=f"iteration of the {count} policies",
        memory=memory_of(full), flops_per_unit=flops_of(one),
        seconds_per_unit=seconds / timed_iterations,
        program=f"bcq.make_chunk_fn, chunks of {min(bcq_train.CHUNK_ITERATIONS, iterations)}")


def dataset_cost(env, config: RunConfig) -> dict:
    """Generating the dataset: every agent's episode, all agents stepped
    together; the vmapped env step measured (the logging policies' networks
    not counted)."""
    covariates = np.repeat(env.test_agents, math.ceil(config.num_agents / 5), axis=0)
    covariates = jnp.asarray(covariates[:config.num_agents], jnp.float32)
    params = jax.vmap(env.covariates_to_params)(covariates)
    keys = jax.random.split(jax.random.PRNGKey(0), config.num_agents)
    obs, state = jax.vmap(env.reset)(keys, params)
    action = (jnp.zeros((config.num_agents,), jnp.int32) if env.discrete_actions
              else jnp.zeros((config.num_agents, env.action_dim), jnp.float32))

    def steps(length):
        def run(keys, state, action, params):
            def body(state, _):
                _, state, *_ = jax.vmap(env.step_env)(keys, state, action, params)
                return state, None
            return jax.lax.scan(body, state, None, length=length)[0]
        return jax.jit(run)

    args = (keys, state, action, params)
    full = compile_program(steps(env.max_episode_steps), args)
    one = compile_program(steps(1), args)
    timed_steps = min(env.max_episode_steps, TIMED_STEPS)
    seconds = seconds_of(compile_program(steps(timed_steps), args), args) / timed_steps
    return stage_row(
        work={"agents": config.num_agents, "steps": env.max_episode_steps,
              "env_steps": config.num_agents * env.max_episode_steps},
        units=env.max_episode_steps, unit=f"env step of the {config.num_agents} agents",
        memory=memory_of(full), flops_per_unit=flops_of(one), seconds_per_unit=seconds,
        program="vmapped env.step_env (the logging policies not counted)")


# ---------------------------------------------------------------------------
# The report


def env_cost(env_name: str, config: RunConfig) -> dict:
    """{settings, stages: {name: row}, expected_seconds_per_cell,
    peak_memory_bytes} of one cell of `env_name` (every dataset alike:
    num_agents full-length episodes, an upper bound where episodes end early)."""
    env = envs.make(env_name)
    chosen = methods_for(env, config)
    steps = env.max_episode_steps
    transitions = config.num_agents * steps
    say(f"{env_name}: measuring the dataset stage's program")
    stages = {"dataset": dataset_cost(env, config)}
    by_name = {m.name: m for m in chosen}
    say(f"{env_name}: measuring PerSim's training epoch")
    stages["train_persim"] = train_cost(env, config, transitions)
    say(f"{env_name}: measuring PerSim's MPC episodes")
    persim_mpc = mpc_cost(env, config, by_name["persim"], random_simulator(env, config),
                          config.trials)
    for method in chosen:
        name = method.name
        if name in ("population", "per_agent"):
            rows = transitions if name == "population" else 5 * steps
            share = rows / transitions
            row = stages["train_persim"]
            stages[f"train_{name}"] = borrowed(
                row, {"transitions": rows, "epochs": config.epochs, "trials": config.trials},
                row["units"] * share, "train_persim")
        elif name in ("bcq_p", "bcq_a"):
            say(f"{env_name}: measuring {name}'s training chunk")
            stages[f"train_{name}"] = bcq_cost(env, config, method, transitions, steps)
        elif name in ("vanilla_cadm", "pe_ts_cadm"):
            settings = method.config
            stages[f"train_{name}"] = not_estimated(
                {"iterations": settings.iterations, "epochs_per_iteration": settings.epochs,
                 "pairs_per_epoch": settings.pairs_per_epoch or "every pair",
                 "trials": config.trials}, "its fits stop early by their validation rule")
        if isinstance(method, methods.ModelBased) and method.predicts:
            stages[f"prediction_{name}"] = not_estimated(
                {"trials": config.trials, "agents": 5, "episodes": config.prediction_episodes,
                 "steps": paper.PREDICTION_WARMUP + paper.PREDICTION_HORIZON},
                "no planning: small beside MPC")
        if name == "persim":
            stages["reward_persim"] = persim_mpc
        elif name == "true_env_mpc":
            say(f"{env_name}: measuring True env + MPC's episodes")
            stages["reward_true_env_mpc"] = mpc_cost(env, config, method, None, 1)
        elif name in ("population", "per_agent"):
            stages[f"reward_{name}"] = borrowed(persim_mpc, persim_mpc["work"],
                                                persim_mpc["units"], "reward_persim")
        elif name in ("vanilla_cadm", "pe_ts_cadm"):
            stages[f"reward_{name}"] = not_estimated(
                {**persim_mpc["work"], "particles": method.config.particles},
                "CaDM's own dynamics and particles")
        else:
            stages[f"reward_{name}"] = not_estimated(
                {"trials": config.trials, "agents": 5, "episodes": config.policy_episodes,
                 "steps": config.max_steps or steps}, "a policy network per step: small")
    expected = sum(r["expected_seconds"] or 0.0 for r in stages.values())
    peaks = [r["memory"]["total"] for r in stages.values() if r["memory"]]
    return {"settings": data.jsonable(dataclasses.asdict(config)), "stages": stages,
            "expected_seconds_per_cell": expected,
            "peak_memory_bytes": max(peaks) if peaks else None}


def device_record() -> dict:
    device = jax.devices()[0]
    return {"backend": jax.default_backend(),
            "device_kind": getattr(device, "device_kind", str(device)),
            "devices": jax.device_count(), "jax": jax.__version__}


def cost_report(env_names, datasets, methods_flag, overrides: dict | None) -> dict:
    """The whole report (module docstring); `overrides` of the paper preset."""
    per_env = {}
    for env_name in env_names:
        config = resolve(env_name, datasets[0], PRESET,
                         {**(overrides or {}), "methods": methods_flag})
        per_env[env_name] = env_cost(env_name, config)
    total = sum(e["expected_seconds_per_cell"] for e in per_env.values()) * len(datasets)
    return {"request": request_of(env_names, datasets, methods_flag, overrides),
            "date": datetime.date.today().isoformat(),
            "basis": {
                "memory": "XLA memory_analysis of each stage's compiled program at its real "
                          "size, per device (total = arguments + outputs - aliased + "
                          "temporaries + generated code)",
                "flops": "XLA cost_analysis of the program with its loops cut to one trip, "
                         "times the trips",
                "seconds": "measured on this device: the program at a shortened size (best "
                           "of 2 calls after a compiling one), scaled to the work; compilation "
                           "and the stages not estimated are not included"},
            "cells": [f"{e}/{d}" for e in env_names for d in datasets],
            "envs": per_env, "expected_seconds_total": total}


def request_of(env_names, datasets, methods_flag, overrides) -> dict:
    return {"envs": list(env_names), "datasets": list(datasets), "methods": list(methods_flag),
            "preset": PRESET, "overrides": overrides or {}, **device_record()}


def _size(value) -> str:
    if value is None:
        return "–"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def _count(value) -> str:
    if value is None:
        return "–"
    return f"{value:.3g}" if value >= 1e4 else f"{value:g}"


def _seconds(value) -> str:
    if value is None:
        return "–"
    return f"{value / 3600:.2f} h" if value >= 3600 else f"{value:.1f} s"


def format_report(report: dict) -> str:
    """The report as a markdown table per env, and the total."""
    lines = [f"# Cost report: {', '.join(report['cells'])} ({report['request']['backend']}, "
             f"{report['request']['devices']} × {report['request']['device_kind']})", ""]
    header = ["stage", "units", "unit", "memory per device", "FLOPs", "s per unit",
              "expected", "basis"]
    for env_name, entry in report["envs"].items():
        rows = [[name, _count(r["units"]), r["unit"] or "–",
                 _size((r["memory"] or {}).get("total")), _count(r["flops"]),
                 "–" if r["seconds_per_unit"] is None else f"{r['seconds_per_unit']:.3g}",
                 _seconds(r["expected_seconds"]), r["basis"]]
                for name, r in entry["stages"].items()]
        lines += [f"## {paper.display_name(env_name)}: one cell", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                  *("| " + " | ".join(row) + " |" for row in rows), "",
                  f"Expected per cell: {_seconds(entry['expected_seconds_per_cell'])}; peak "
                  f"memory per device: {_size(entry['peak_memory_bytes'])}.", ""]
    lines.append(f"Expected in all ({len(report['cells'])} cells): "
                 f"{_seconds(report['expected_seconds_total'])}.")
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with data.atomic_write(path) as handle:
        handle.write((json.dumps(data.jsonable(payload), indent=1) + "\n").encode("utf-8"))


def load_or_measure(path: str, env_names, datasets, methods_flag, overrides) -> dict:
    """The cost report at `path` if made for this request on this device,
    else a new one (written atomically)."""
    request = data.jsonable(request_of(env_names, datasets, methods_flag, overrides))
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as handle:
                stored = json.load(handle)
            if stored.get("request") == request:
                say(f"reusing the cost report {path}")
                return stored
        except (OSError, json.JSONDecodeError):
            pass
    report = cost_report(env_names, datasets, methods_flag, overrides)
    write_json(path, report)
    return report


# ---------------------------------------------------------------------------
# Measured timings


def cell_timings(work: str, env_name: str, dataset: str) -> dict | None:
    """A finished cell's seconds: each stage record's (train per method and
    trial, prediction and reward per method) and results.json's timing_s."""
    folder = os.path.join(work, env_name, dataset)
    results_path = os.path.join(folder, "results.json")
    if not os.path.exists(results_path):
        return None
    with open(results_path, encoding="utf-8") as handle:
        results = json.load(handle)
    stages = {}
    for path in sorted(glob.glob(os.path.join(folder, "stages", "*.json"))):
        with open(path, encoding="utf-8") as handle:
            stages[os.path.basename(path)[:-len(".json")]] = json.load(handle).get("seconds")
    return {"timing_s": results.get("timing_s"), "stage_seconds": stages,
            "backend": results.get("backend"), "devices": results.get("devices")}


def write_timings(path: str, work: str, report: dict) -> dict:
    """`timings.json`: every finished cell's measured seconds beside the cost
    report's expectation per cell."""
    cells = {}
    for cell in report["cells"]:
        env_name, dataset = cell.split("/")
        measured = cell_timings(work, env_name, dataset)
        if measured is not None:
            measured["expected_seconds"] = report["envs"][env_name]["expected_seconds_per_cell"]
            measured["expected_stage_seconds"] = {
                name: row["expected_seconds"]
                for name, row in report["envs"][env_name]["stages"].items()}
            cells[cell] = measured
    payload = {"date": datetime.date.today().isoformat(), "cost_report": REPORT_FILE,
               "device": device_record(), "cells": cells}
    write_json(path, payload)
    return payload


# ---------------------------------------------------------------------------
# The command


def check_request(env_names, datasets) -> None:
    unknown_envs = sorted(set(env_names) - set(ALL_ENVS))
    if unknown_envs:
        raise UserError(f"--envs: unknown {', '.join(unknown_envs)}; valid: {', '.join(ALL_ENVS)}")
    unknown = sorted(set(datasets) - set(DATASETS))
    if unknown:
        raise UserError(f"--datasets: unknown {', '.join(unknown)}; valid: {', '.join(DATASETS)}")
    if not env_names or not datasets:
        raise UserError("--envs and --datasets: name at least one each")


def run(env_names, datasets, methods_flag, out_dir: str, data_dir: str, record_dir: str,
        overrides: dict | None = None, cost_only: bool = False) -> int:
    """The command: the cost report, then the cells, then their timings."""
    check_request(env_names, datasets)
    for env_name in env_names:       # a bad --methods is reported before anything runs
        resolve(env_name, datasets[0], PRESET,
                {**(overrides or {}), "methods": methods_flag}).method_names(
                    tuple(methods.REGISTRY))
    work = os.path.join(out_dir, PRESET)
    report = load_or_measure(os.path.join(work, REPORT_FILE), env_names, datasets, methods_flag,
                             overrides)
    print(format_report(report), flush=True)
    print(f"[paper_scale] cost report: {os.path.join(work, REPORT_FILE)}", flush=True)
    if cost_only:
        return 0
    failed = []
    for env_name in env_names:
        for dataset in datasets:
            failed += reproduce.run_cells([env_name], [dataset], PRESET, methods_flag, out_dir,
                                          data_dir, record_dir, overrides)
            write_timings(os.path.join(work, TIMINGS_FILE), work, report)
    print(f"[paper_scale] timings: {os.path.join(work, TIMINGS_FILE)}", flush=True)
    print(f"[paper_scale] record: {reproduce.write_report(record_dir, PRESET)}", flush=True)
    if failed:
        print(f"[paper_scale] failed: {', '.join(failed)} (rerun the command to resume)",
              flush=True)
        return 1
    return 0


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    out_dir, data_dir, record_dir = FLAGS.out_dir, FLAGS.data_dir, FLAGS.record_dir
    overrides = None
    if FLAGS.dry_run:
        overrides = dict(DRY_RUN)
        if not FLAGS["out_dir"].present:
            out_dir = tempfile.mkdtemp(prefix="persim_paper_scale_")
        data_dir = os.path.join(out_dir, "data")
        record_dir = os.path.join(out_dir, "record")
        print(f"[paper_scale] dry run in {out_dir}", flush=True)
    return cli.exit_on_user_error(functools.partial(
        run, FLAGS.envs, FLAGS.datasets, FLAGS.methods, out_dir, data_dir, record_dir,
        overrides, FLAGS.cost_only))


if __name__ == "__main__":
    define_flags()
    app.run(main)
