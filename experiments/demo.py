"""Smoke demo of the heterogeneous environments.

    python -m experiments.demo [--envs=mountaincar,cartpole,halfcheetah] [--agents=500]

For each env, samples the paper's population (units 0..4 are the test agents,
the rest uniform in Table 1's ranges), plays one episode per agent with
uniformly random actions (the paper's `random` logging policy), all agents in
one jitted `lax.scan` of vmapped steps, and prints the test agents' returns and
the population's mean return and length. HalfCheetah episodes are cut at
`--halfcheetah_steps` so that the demo stays quick on a CPU.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import envs

_ENVS = flags.DEFINE_list("envs", list(envs.ENV_NAMES), "Environments to run.")
_AGENTS = flags.DEFINE_integer("agents", 500, "Agents in the population (>= 5).")
_HALFCHEETAH_STEPS = flags.DEFINE_integer(
    "halfcheetah_steps", 50, "Steps per HalfCheetah episode (the paper's cap is 1000).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")



@functools.partial(jax.jit, static_argnums=(0, 1))
def random_episodes(env, num_steps, key, params):
    """One episode per agent under random actions; returns (A,) returns and
    (A,) lengths. Steps after an agent's episode ended are not counted."""
    num_agents = jax.tree.leaves(params)[0].shape[0]
    reset_keys, key = jax.random.split(key, (2, num_agents)), key
    _, state = jax.vmap(env.reset)(reset_keys[0], params)

    def one_step(carry, step_key):
        state, total, length, alive = carry
        keys = jax.random.split(step_key, (2, num_agents))
        action = jax.vmap(env.action_space().sample)(keys[0])
        _, state, reward, done, _ = jax.vmap(env.step)(keys[1], state, action, params)
        total = total + jnp.where(alive, reward, 0.0)
        length = length + alive
        return (state, total, length, alive & ~done), None

    init = (state, jnp.zeros(num_agents), jnp.zeros(num_agents, jnp.int32),
            jnp.ones(num_agents, bool))
    (_, total, length, _), _ = jax.lax.scan(one_step, init, jax.random.split(key, num_steps))
    return total, length


def main(argv):
    del argv
    key = jax.random.PRNGKey(_SEED.value)
    for name in _ENVS.value:
        env = envs.make(name)
        agent_key, key = jax.random.split(key)
        covariates = env.sample_agents(agent_key, _AGENTS.value)
        params = env.agent_params(covariates)
        # MJX physics is slow on a CPU: continuous-action (MuJoCo) envs play short episodes.
        steps = env.max_episode_steps if env.discrete_actions else _HALFCHEETAH_STEPS.value
        start = time.perf_counter()
        returns, lengths = jax.block_until_ready(random_episodes(env, steps, key, params))
        seconds = time.perf_counter() - start
        returns, lengths = np.asarray(returns), np.asarray(lengths)
        print(f"\n{name}: {_AGENTS.value} agents, random actions, episodes of at most {steps} steps "
              f"({seconds:.1f} s incl. compilation)")
        header = " | ".join(f"{c:>13}" for c in env.covariate_names)
        print(f"  {'agent':>5} | {header} | {'return':>8} | {'length':>6}")
        for unit in range(min(5, _AGENTS.value)):
            cov = " | ".join(f"{v:>13.5g}" for v in np.asarray(covariates[unit]))
            print(f"  {unit:>5} | {cov} | {returns[unit]:>8.1f} | {lengths[unit]:>6d}")
        print(f"  population: mean return {returns.mean():.1f} ± {returns.std():.1f}, "
              f"mean length {lengths.mean():.1f}")


if __name__ == "__main__":
    app.run(main)
