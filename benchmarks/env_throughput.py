"""Environment throughput: 500 heterogeneous agents vs 500 copies of one.

    python -m benchmarks.env_throughput [--envs=cartpole,halfcheetah] [--agents=500]

Prints one JSON line per env: steps/s (agent-steps per second) of a jitted
`lax.scan` over `--steps` vmapped env steps with uniformly random actions,
for `--agents` agents sampled from the paper's ranges (each with its own
physics: batched params) and for as many copies of the default agent (params
shared, `in_axes=None`). Target: heterogeneous >= 0.5 x homogeneous.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import app, flags

import envs
from benchmarks.common import best_time, emit, machine

_ENVS = flags.DEFINE_list("envs", list(envs.ENV_NAMES), "Environments to measure.")
_AGENTS = flags.DEFINE_integer("agents", 500, "Agents stepped together.")
_STEPS = flags.DEFINE_integer("steps", 0, "Steps per scan (0: 200 classic, 20 halfcheetah).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats; the best is reported.")



@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def run_agents(env, num_steps, params_axis, key, params):
    """Resets `key.shape[0]` agents and steps them `num_steps` times; returns
    the summed rewards (A,). `params_axis` is 0 (one param set per agent) or
    None (one set shared by all)."""
    num_agents = key.shape[0]
    reset = jax.vmap(env.reset, in_axes=(0, params_axis))
    step = jax.vmap(env.step, in_axes=(0, 0, 0, params_axis))
    _, state = reset(key, params)

    def one_step(carry, step_key):
        state, total = carry
        keys = jax.random.split(step_key, (2, num_agents))
        action = jax.vmap(env.action_space().sample)(keys[0])
        _, state, reward, _, _ = step(keys[1], state, action, params)
        return (state, total + reward), None

    (_, total), _ = jax.lax.scan(one_step, (state, jnp.zeros(num_agents)),
                                 jax.random.split(key[0], num_steps))
    return total


def measure(name: str, num_agents: int, num_steps: int, repeats: int) -> dict:
    env = envs.make(name)
    keys = jax.random.split(jax.random.PRNGKey(0), num_agents)
    heterogeneous = env.agent_params(env.sample_agents(jax.random.PRNGKey(1), num_agents))
    homogeneous = env.agent_params(env.default_agent)
    rates = {}
    for label, params, axis in (("heterogeneous", heterogeneous, 0),
                                ("homogeneous", homogeneous, None)):
        fn = functools.partial(run_agents, env, num_steps, axis, keys, params)
        jax.block_until_ready(fn())  # compile
        rates[label] = num_agents * num_steps / best_time(fn, repeats)
    return {
        "bench": "env",
        "env": name,
        "agents": num_agents,
        "steps": num_steps,
        "heterogeneous_steps_per_s": round(rates["heterogeneous"], 1),
        "homogeneous_steps_per_s": round(rates["homogeneous"], 1),
        "ratio": round(rates["heterogeneous"] / rates["homogeneous"], 3),
        **machine(),
    }


def main(argv):
    del argv
    for name in _ENVS.value:
        steps = _STEPS.value or (20 if name == "halfcheetah" else 200)
        emit(measure(name, _AGENTS.value, steps, _REPEATS.value))


if __name__ == "__main__":
    app.run(main)
