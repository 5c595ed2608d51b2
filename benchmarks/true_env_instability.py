"""Where True env + MPC's NaN return on HalfCheetah agent (0.3, 0.3) comes
from: one episode of the quick planner (CEM 50 × 10 × 3 rounds) on MuJoCo's
C simulator (`physics="mujoco"`), the real steps on the MJX env, stepped
from Python so every state can be looked at.

    python -m benchmarks.true_env_instability [--seed=0] [--mass=0.3 --damping=0.3]
        [--out=benchmarks/results/true_env_instability.jsonl]

Writes a JSON line every 100 steps (return so far, the largest |qvel| of
the MJX state, the action) and one at the end (or at the first non-finite
observation, with the C simulator's step from the same state and action
beside it). MuJoCo prints "Nan, Inf or huge value in QACC ... unstable"
on stdout whenever a planned candidate's C state diverges (it then resets
that candidate's data); count them in the command's output.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
from absl import app, flags

import envs
from experiments import paper
from persim_jax import planning
from persim_jax.data import atomic_write
from persim_jax.dynamics import true_env_dynamics_for_agent

_SEED = flags.DEFINE_integer("seed", 0, "Planner and reset keys.")
_MASS = flags.DEFINE_float("mass", 0.3, "The agent's mass scale.")
_DAMPING = flags.DEFINE_float("damping", 0.3, "The agent's damping scale.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/true_env_instability.jsonl", "JSON lines.")


def main(argv):
    del argv
    env = envs.make("halfcheetah")
    covariates = np.array([_MASS.value, _DAMPING.value], np.float32)
    params = jax.tree.map(lambda x: x[0], env.agent_params(jnp.asarray(covariates)[None]))
    planner = planning.make_planner(paper.planner_config(
        env, num_samples=50, horizon=10, num_rounds=2, num_elites=10), env)
    dynamics = true_env_dynamics_for_agent(env, "mujoco")(0, jnp.asarray(covariates))
    plan = jax.jit(lambda key, state, obs: planner.plan(key, state, obs, dynamics))
    step = jax.jit(env.step_env)
    key = jax.random.PRNGKey(_SEED.value)
    obs, state = jax.jit(env.reset_env)(jax.random.PRNGKey(100 + _SEED.value), params)
    plan_state = planner.init()
    rows, total, start = [], 0.0, time.time()
    base = {"covariates": covariates.tolist(), "seed": _SEED.value}
    for t in range(env.max_episode_steps):
        key, plan_key = jax.random.split(key)
        action, plan_state = plan(plan_key, plan_state, obs)
        next_obs, next_state, reward, _, _ = step(plan_key, state, action, params)
        finite = bool(np.all(np.isfinite(np.asarray(next_obs))))
        if t % 100 == 0 or not finite:
            rows.append({**base, "t": t, "return": total, "finite": finite,
                         "max_abs_qvel": float(np.abs(np.asarray(state.data.qvel)).max()),
                         "action": np.asarray(action).tolist(),
                         "seconds": round(time.time() - start, 1)})
            print(json.dumps(rows[-1]), flush=True)
        if not finite:
            model = env.c_model_for_covariates(covariates)
            data = mujoco.MjData(model)
            data.qpos[:] = np.asarray(state.data.qpos, np.float64)
            data.qvel[:] = np.asarray(state.data.qvel, np.float64)
            data.ctrl[:] = np.clip(np.asarray(action, np.float64), -1, 1)
            for _ in range(env.frame_skip):
                mujoco.mj_step(model, data)
            rows.append({**base, "t": t, "c_step_finite": bool(np.all(np.isfinite(data.qvel))),
                         "c_max_abs_qvel": float(np.abs(data.qvel).max())})
            break
        total += float(reward)
        obs, state = next_obs, next_state
    rows.append({**base, "done": True, "return": total, "steps": t + 1})
    print(json.dumps(rows[-1]), flush=True)
    with atomic_write(_OUT.value, "w") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    app.run(main)
