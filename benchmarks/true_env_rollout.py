"""True env + MPC on a CPU: HalfCheetah's true dynamics in the planner by
MuJoCo's C simulator (`mujoco.rollout` on native threads, behind
`jax.pure_callback`: `persim_jax.mujoco_physics`) against MJX.

    python -m benchmarks.true_env_rollout [--sequences=20] [--horizons=1,10,30]
        [--repeats=3] [--episode_steps=20] [--mjx_episode_steps=3]
        [--full_episode] [--parts=agreement,planner,episodes] [--physics=mujoco,mjx]
        [--out=benchmarks/results/true_env_rollout.json]

Writes one JSON record (atomically) with three parts, all on the 5 test
agents:

  agreement: the same action sequences (uniform in [-1, 1]) rolled out open
    loop from the same reset states by both engines, each feeding its own
    predictions: per step t the max-abs state difference (over the 18
    coordinates; median and max over sequences) and, at each horizon, the
    difference of the undiscounted returns. HalfCheetah's gait is chaotic,
    so this is a measurement, not a pass/fail.
  planner: one jitted CEM plan per call, the physics steps it costs as env
    steps per second (env step = 5 MuJoCo substeps; a plan takes samples ×
    horizon × (1 + refinement rounds) env steps per agent), at the quick
    preset's planner (CEM 50 × 10 × 3 rounds) and the paper's (200 × 30 × 6
    rounds), for one agent (the planner splits its candidates over the CPU
    devices) and for the 5 agents vmapped into one call; with MuJoCo, the
    fraction of a plan's time spent inside `mujoco.rollout` (the rest is
    the planner's own work and the callback's overhead). Best of
    `--repeats` calls after a compiling one (MJX: one timed call; at the
    paper's size one agent unless --mjx_paper_agents).
  episodes: `evaluation.run_episodes` of True env + MPC with the quick
    planner, 5 agents × 1 episode (the quick preset's), as the HalfCheetah
    quick cell runs it (default options: one CPU device per core, one
    episode at a time per device) and with every episode of a device vmapped
    into one program (chunk_size=None, so one host call steps all its
    episodes' candidates). Seconds of a second call (the first compiles) of
    `--episode_steps` (MuJoCo) / `--mjx_episode_steps` (MJX) steps, per MPC
    step and extrapolated to a 1000-step episode (`extrapolated: true`);
    `--full_episode` also times whole 1000-step episodes with MuJoCo, in
    one call whose time includes the compilation (`includes_compilation`).
"""

from __future__ import annotations

import json
import os
import time

if __name__ == "__main__":
    # One JAX CPU device per core, as the experiments run (before envs
    # imports gymnax, which starts JAX's backends).
    from persim_jax import runtime
    runtime.use_cpu_cores()

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import envs
from benchmarks.common import machine
from envs.halfcheetah import RESET_NOISE_SCALE
from experiments.config import resolve
from persim_jax import dynamics, evaluation, methods, planning
from persim_jax.data import atomic_write
from persim_jax.mujoco_physics import host_physics

_SEQUENCES = flags.DEFINE_integer("sequences", 20, "Action sequences per agent (agreement).")
_HORIZONS = flags.DEFINE_list("horizons", ["1", "10", "30"], "Horizons of the agreement.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed plan calls; the best is reported.")
_EPISODE_STEPS = flags.DEFINE_integer("episode_steps", 20, "MPC steps timed with MuJoCo.")
_MJX_EPISODE_STEPS = flags.DEFINE_integer("mjx_episode_steps", 3, "MPC steps timed with MJX.")
_FULL_EPISODE = flags.DEFINE_bool("full_episode", False,
                                  "Also time whole 1000-step episodes with MuJoCo.")
_PARTS = flags.DEFINE_list("parts", ["agreement", "planner", "episodes"], "Parts to measure.")
_PHYSICS = flags.DEFINE_list("physics", ["mujoco", "mjx"], "Engines to measure.")
_MJX_PAPER_AGENTS = flags.DEFINE_bool(
    "mjx_paper_agents", False, "Also time MJX's paper-size plan for the 5 agents vmapped "
    "(minutes per call on a CPU); by default one agent only.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/true_env_rollout.json",
                           "The JSON record (written atomically).")


def say(message: str) -> None:
    print(f"[true_env_rollout] {message}", flush=True)


def planner_settings(env) -> dict:
    """{quick, paper}: the HalfCheetah cells' CEM configs."""
    return {preset: resolve("halfcheetah", "random", preset).planner_config(env)
            for preset in ("quick", "paper")}


def env_steps_per_plan(config) -> int:
    """Env steps one CEM plan of one agent simulates."""
    return config.num_samples * config.horizon * (config.num_rounds + 1)


def reset_obs(env, count: int, rng) -> np.ndarray:
    """(count, 18) observations of the env's reset distribution: qpos0 and
    zero velocities plus N(0, 0.001²) on each (obs[0], the x-velocity, is 0)."""
    obs = np.zeros((count, env.obs_dim), np.float32)
    obs[:, 1:9] = env.mj_model.qpos0[1:] + RESET_NOISE_SCALE * rng.standard_normal((count, 8))
    obs[:, 9:] = RESET_NOISE_SCALE * rng.standard_normal((count, 9))
    return obs


def one_step(env, physics: str):
    """jit(vmap over agents): covariates (K, P), obs (K, B, 18), action
    (K, B, 6) -> (K, B, 18) next obs under `physics`."""
    for_agent = dynamics.TrueEnvDynamicsForAgent(env, physics)
    return jax.jit(jax.vmap(lambda c, obs, action: for_agent(0, c)(obs, action)[0]))


def agreement(env, covariates, num_sequences: int, horizons) -> dict:
    """Open-loop state and return differences of the two engines."""
    rng = np.random.default_rng(0)
    agents = covariates.shape[0]
    longest = max(horizons)
    start = reset_obs(env, agents * num_sequences, rng).reshape(agents, num_sequences, -1)
    actions = rng.uniform(-1, 1, (longest, agents, num_sequences, env.action_dim))
    actions = actions.astype(np.float32)
    reward = jax.jit(env.reward)
    trajectories, returns = {}, {}
    for physics in ("mujoco", "mjx"):
        step = one_step(env, physics)
        obs, total, states, totals = jnp.asarray(start), 0.0, [], []
        for action in actions:                 # one compiled step, called per time step
            next_obs = step(covariates, obs, action)
            total = total + np.asarray(reward(obs, action, next_obs), np.float64)
            obs = next_obs
            states.append(np.asarray(obs))
            totals.append(total)
        trajectories[physics], returns[physics] = np.stack(states), np.stack(totals)
    state_gap = np.abs(trajectories["mujoco"] - trajectories["mjx"]).max(axis=-1)   # (T, K, S)
    return_gap = np.abs(returns["mujoco"] - returns["mjx"])                          # (T, K, S)
    by_horizon = {}
    for horizon in horizons:
        t = horizon - 1
        by_horizon[str(horizon)] = {
            "state_max_abs_diff_median": float(np.median(state_gap[t])),
            "state_max_abs_diff_max": float(state_gap[t].max()),
            "return_abs_diff_median": float(np.median(return_gap[t])),
            "return_abs_diff_max": float(return_gap[t].max()),
            "return_mujoco_mean": float(returns["mujoco"][t].mean()),
            "return_abs_mean": float(np.abs(returns["mujoco"][t]).mean()),
        }
    return {"sequences_per_agent": num_sequences, "agents": agents,
            "start": "reset distribution", "actions": "uniform [-1, 1]",
            "per_step_state_max_abs_diff_median": [float(np.median(g)) for g in state_gap],
            "by_horizon": by_horizon}


def plan_program(env, physics: str, config, agents: int):
    """jit: (key, covariates (K, P), obs (K, 18)) -> actions (K, 6), one CEM
    plan per agent (K = `agents`; vmapped when K > 1)."""
    planner = planning.make_planner(config, env)
    for_agent = dynamics.TrueEnvDynamicsForAgent(env, physics)

    def one(key, covariates, obs):
        action, _ = planner.plan(key, planner.init(), obs, for_agent(0, covariates))
        return action

    if agents == 1:
        return jax.jit(lambda key, c, obs: one(key, c[0], obs[0])[None])
    return jax.jit(lambda key, c, obs: jax.vmap(one, in_axes=(None, 0, 0))(key, c, obs))


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call's seconds, best of `repeats` later calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return first, best


def timed_rollouts(host) -> None:
    """Makes `host` add the seconds of its `mujoco.rollout` calls to
    `host.rollout_seconds` (how much of a plan is the C physics)."""
    rollout = host.pool.rollout
    host.rollout_seconds = 0.0

    def timed_rollout(*args, **kwargs):
        start = time.perf_counter()
        try:
            return rollout(*args, **kwargs)
        finally:
            host.rollout_seconds += time.perf_counter() - start

    host.pool.rollout = timed_rollout


def planner_rates(env, covariates, configs, repeats: int, engines) -> list[dict]:
    """Env steps per second of the planner's dynamics per engine and size.
    MJX's calls take seconds to minutes: one timed call after the compiling
    one, and at the paper's size one agent unless --mjx_paper_agents."""
    rows = []
    obs = jnp.asarray(reset_obs(env, covariates.shape[0], np.random.default_rng(1)))
    host = host_physics(env)
    timed_rollouts(host)
    for size, config in configs.items():
        steps = env_steps_per_plan(config)
        for agents in (1, covariates.shape[0]):
            c, o = covariates[:agents], obs[:agents]
            for physics in engines:
                if (physics == "mjx" and size == "paper" and agents > 1
                        and not _MJX_PAPER_AGENTS.value):
                    continue
                program = plan_program(env, physics, config, agents)
                key = jax.random.PRNGKey(0)
                say(f"plan {size} {physics} agents={agents}")
                first, best = timed(lambda: program(key, c, o),
                                    repeats if physics == "mujoco" else 1)
                in_rollout = None
                if physics == "mujoco":     # one more call, timing the C rollouts inside it
                    host.rollout_seconds = 0.0
                    start = time.perf_counter()
                    jax.block_until_ready(program(key, c, o))
                    in_rollout = host.rollout_seconds / (time.perf_counter() - start)
                rows.append({"size": size, "physics": physics, "agents": agents,
                             "samples": config.num_samples, "horizon": config.horizon,
                             "rounds": config.num_rounds + 1,
                             "env_steps_per_plan": steps * agents,
                             "compile_and_first_s": first, "seconds_per_plan_call": best,
                             "env_steps_per_s": steps * agents / best,
                             "fraction_in_mujoco_rollout": in_rollout})
                say(json.dumps(rows[-1]))
    return rows


def episode_times(env, covariates, config, physics: str, steps: int, chunk_size,
                  label: str, warm: bool = True) -> dict:
    """Seconds of run_episodes (5 agents × 1 episode, `steps` MPC steps): of
    a second call when `warm`, else of the first (compilation included)."""
    planner = planning.make_planner(config, env)
    for_agent = methods.TrueEnvMPC(env, physics).dynamics_for_agent(None, range(len(covariates)))
    options = {"max_steps": steps}
    if chunk_size != "default":
        options["chunk_size"] = chunk_size

    def run():
        return evaluation.run_episodes(jax.random.PRNGKey(0), planner, for_agent, env,
                                       np.asarray(covariates), 1, **options)

    say(f"episodes {physics} {label} steps={steps}")
    start = time.perf_counter()
    returns = run()
    first = seconds = time.perf_counter() - start
    if warm:
        start = time.perf_counter()
        returns = run()
        seconds = time.perf_counter() - start
    row = {"physics": physics, "options": label, "agents": len(covariates), "episodes": 1,
           "steps_timed": steps, "compile_and_first_s": first, "seconds": seconds,
           "seconds_per_mpc_step": seconds / steps,
           "seconds_per_1000_step_episode": seconds / steps * 1000,
           "extrapolated": steps != 1000, "includes_compilation": not warm,
           "returns": np.asarray(returns).ravel().tolist()}
    say(json.dumps(row))
    return row


def main(argv):
    del argv
    env = envs.make("halfcheetah")
    covariates = jnp.asarray(env.test_agents, jnp.float32)
    configs = planner_settings(env)
    record = {"benchmark": "true_env_rollout", "machine": machine(),
              "load_average_at_start": list(os.getloadavg()),
              "test_agents": np.asarray(env.test_agents).tolist(),
              "planners": {k: {"samples": c.num_samples, "horizon": c.horizon,
                               "rounds": c.num_rounds + 1, "elites": c.num_elites}
                           for k, c in configs.items()},
              "threads": host_physics(env).num_threads}
    parts = set(_PARTS.value)
    if "agreement" in parts:
        say("agreement")
        record["agreement"] = agreement(env, covariates, _SEQUENCES.value,
                                        [int(h) for h in _HORIZONS.value])
        say(json.dumps(record["agreement"]["by_horizon"]))
        write(record)
    if "planner" in parts:
        record["planner"] = planner_rates(env, covariates, configs, _REPEATS.value,
                                          _PHYSICS.value)
        write(record)
    if "episodes" in parts:
        quick = configs["quick"]
        default = "default (1 episode at a time per device)"
        rows = []
        if "mujoco" in _PHYSICS.value:
            rows += [episode_times(env, covariates, quick, "mujoco", _EPISODE_STEPS.value,
                                   "default", default),
                     episode_times(env, covariates, quick, "mujoco", _EPISODE_STEPS.value, None,
                                   "chunk_size=None (a device's episodes vmapped)")]
        if "mjx" in _PHYSICS.value:
            rows.append(episode_times(env, covariates, quick, "mjx", _MJX_EPISODE_STEPS.value,
                                      "default", default))
        record["episodes"] = rows
        write(record)
        if _FULL_EPISODE.value and "mujoco" in _PHYSICS.value:
            # One call (a second would double ~15 min): its compilation is
            # about the 20-step row's compile_and_first_s minus its seconds.
            rows.append(episode_times(env, covariates, quick, "mujoco", 1000, "default",
                                      default, warm=False))
        record["episodes"] = rows
    write(record)
    say(f"wrote {_OUT.value}")


def write(record: dict) -> None:
    """Writes the record so far (atomically), with the load average now."""
    record["load_average_at_end"] = list(os.getloadavg())
    with atomic_write(_OUT.value, "w") as handle:
        json.dump(record, handle, indent=1)


if __name__ == "__main__":
    app.run(main)
