"""Episodes: every (agent, episode) pair played out in one compiled program.

    planner = experiments.paper.planner(env)     # or planning.make_planner(config, env)
    returns = evaluation.run_episodes(
        key, planner, dynamics.simulator_dynamics_for_agent(simulator), env,
        env.test_agents, num_episodes=20)                      # (5, 20)
    returns = evaluation.run_policy_episodes(key, policy_for_agent, env,
                                             env.test_agents, num_episodes=20)

Who acts is an `Actor`: MPC on an agent's dynamics (`PlannerActor`, built by
`run_episodes`) or the agent's own policy (`PolicyActor`, built by
`run_policy_episodes`, for model-free methods); `run_actor_episodes` plays any
`ActorForAgent`.

One episode is a `lax.scan` over the env's steps with the actor inside (a
planner's own rollouts are scans over the horizon, vmapped over candidates and
members). Episodes are vmapped over the agent × episode batch, which is split
over all devices of a `jax.sharding.Mesh` (one shard per device, no
communication in the step loop); `chunk_size` bounds how many episodes a
device runs at once (`lax.map` over chunks), which bounds memory. On a CPU,
`persim_jax.use_cpu_cores()` (called first) makes one device per core, so
that every core plays its own episodes (3-4x faster reward stages on 2 cores
than one device whose small operations XLA splits over both).

Several hosts: run the same script on every host and call
`jax.distributed.initialize()` before anything else (arguments auto-detected
under Slurm, Open MPI and on TPU/GKE; otherwise `coordinator_address`,
`num_processes`, `process_id`; on CPU hosts also set
`jax.config.update("jax_cpu_collectives_implementation", "gloo")`). The mesh
then spans every host's devices, each host computes its shard, and every
process receives all (A, E) returns.

Memory: a device holding K episodes at once (K = chunk_size) needs about
    K · candidates · members · (widths of the layers live at once) · 4 bytes
for one rollout step's activations, plus K · candidates · horizon · action
size for the candidate sequences: linear in each factor, and in the horizon
only through the sequences (the rollout is a scan; nothing is kept per step).
Measured from the compiled program (`memory_analysis`), with the paper's
planners and model sizes: HalfCheetah (CEM 200 × 30, M = 5, layers up to
512) 11.6 MB per simultaneous episode, 1.16 GB for all 5 × 20 at once;
CartPole (1000 × 30, M = 5) 5.6 MB per episode. Both fit in 24 GB of CPU
memory and in one GPU whatever the chunking.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from persim_jax.dynamics import contextual
from persim_jax.planning import Planner
from persim_jax.types import Dynamics, DynamicsForAgent, Policy, PolicyForAgent

BATCH_AXIS = "episodes"


# ---------------------------------------------------------------------------
# Actors: who acts in an episode


class Actor(Protocol):
    """Who acts in one episode of one agent; traced inside the program."""

    def init(self, key: jax.Array) -> Any:
        """The actor's state at the reset (a pytree of arrays); `key`: the
        episode's key (the one its reset and step keys are split from)."""

    def act(self, key: jax.Array, state: Any, obs: jax.Array) -> tuple[jax.Array, Any]:
        """(action: () int32 or (A,) float32, state) for the true obs (D,)."""

    def observe(self, state: Any, obs: jax.Array, action: jax.Array,
                next_obs: jax.Array) -> Any:
        """The state after the real transition obs, action, next_obs."""


class PlannerActor(NamedTuple):
    """MPC: `planner` plans on the agent's `dynamics` (a `Dynamics` or a
    `ContextualDynamics`, whose context observes every real transition).
    State: (planner state, context)."""

    planner: Planner
    dynamics: Any

    def init(self, key):
        # The context's key is folded from the episode's, so that the reset
        # and step keys stay those of models without a context.
        return self.planner.init(), contextual(self.dynamics).init(jax.random.fold_in(key, 1))

    def act(self, key, state, obs):
        plan_state, context = state
        action, plan_state = self.planner.plan(
            key, plan_state, obs, contextual(self.dynamics).dynamics(context))
        return action, (plan_state, context)

    def observe(self, state, obs, action, next_obs):
        plan_state, context = state
        return plan_state, contextual(self.dynamics).observe(context, obs, action, next_obs)


class PolicyActor(NamedTuple):
    """The agent's own policy (model-free methods); no state."""

    policy: Policy

    def init(self, key):
        return ()

    def act(self, key, state, obs):
        return self.policy(key, obs), state

    def observe(self, state, obs, action, next_obs):
        return state


class PlannerActorForAgent(NamedTuple):
    """(row, covariates) -> the `PlannerActor` of `planner` on that agent's
    dynamics. A pytree: the dynamics' arrays are program arguments, the
    planner static."""

    planner: Planner
    dynamics_for_agent: DynamicsForAgent

    def __call__(self, row, covariates) -> PlannerActor:
        return PlannerActor(self.planner, self.dynamics_for_agent(row, covariates))


class PolicyActorForAgent(NamedTuple):
    """(row, covariates) -> the `PolicyActor` of that agent's policy."""

    policy_for_agent: PolicyForAgent

    def __call__(self, row, covariates) -> PolicyActor:
        return PolicyActor(self.policy_for_agent(row, covariates))


# ---------------------------------------------------------------------------
# One episode


def actor_episode_return(key, actor: Actor, env, params, max_steps: int) -> jax.Array:
    """() return of one episode of one agent (jittable, vmappable).

    The env is reset with `key`, then for `max_steps` steps the actor acts on
    the true observation and the env steps (`env.step_env`, no auto reset)
    with the agent's physics `params`. Rewards are summed until the first
    termination; the scan runs on (its later steps are ignored), so that
    episodes of a batch stay in lock step.
    """
    reset_key, run_key = jax.random.split(key)
    obs, state = env.reset(reset_key, params)
    return play(actor, actor.init(key), env, params, obs, state,
                jax.random.split(run_key, max_steps))


def play(actor: Actor, actor_state, env, params, obs, state, keys) -> jax.Array:
    """() the return of `actor` stepping `env` (`step_env`, no auto reset)
    from (obs, state), one step per key of `keys` (S, ...): rewards summed
    until the first termination; the scan runs on so that a batch stays in
    lock step. Shared by the episodes here and `persim_jax.decisions`."""

    def step(carry, key):
        obs, state, actor_state, total, done = carry
        act_key, step_key = jax.random.split(key)
        action, actor_state = actor.act(act_key, actor_state, obs)
        next_obs, state, reward, terminated, _ = env.step_env(step_key, state, action, params)
        actor_state = actor.observe(actor_state, obs, action, next_obs)
        total = total + jnp.where(done, 0.0, reward)
        done = done | terminated
        return (next_obs, state, actor_state, total, done), None

    carry = (obs, state, actor_state, jnp.zeros((), jnp.float32), jnp.array(False))
    (*_, total, _), _ = jax.lax.scan(step, carry, keys)
    return total


def episode_return(key, planner: Planner, dynamics: Dynamics, env, params,
                   max_steps: int) -> jax.Array:
    """() return of one MPC episode of one agent (jittable, vmappable): the
    `PlannerActor` of `planner` on `dynamics` (see `actor_episode_return`).
    A `ContextualDynamics` observes every real transition."""
    return actor_episode_return(key, PlannerActor(planner, dynamics), env, params, max_steps)


# ---------------------------------------------------------------------------
# The compiled batch of episodes


def split_static(tree):
    """(array leaves, static description) of a pytree whose leaves may be
    functions: arrays become arguments of the compiled program."""
    leaves, treedef = jax.tree.flatten(tree)
    is_array = tuple(isinstance(leaf, (jax.Array, np.ndarray, np.generic)) for leaf in leaves)
    arrays = [leaf for leaf, a in zip(leaves, is_array) if a]
    static = tuple(None if a else leaf for leaf, a in zip(leaves, is_array))
    return arrays, (treedef, static)


def join_static(arrays, description):
    """The pytree `split_static` described, with `arrays` as its array leaves."""
    treedef, static = description
    arrays = iter(arrays)
    return jax.tree.unflatten(treedef, [next(arrays) if s is None else s for s in static])


@functools.lru_cache(maxsize=32)
def compiled_episodes(actor_description, env, max_steps, chunk_size, devices):
    """The jitted, sharded program: (actor arrays, agent_index (T,),
    covariates (T, P), keys (T, 2)) -> returns (T,), T a multiple of the
    number of devices; cached per static configuration (`actor_description`:
    `split_static` of an `ActorForAgent`)."""
    mesh = Mesh(np.asarray(devices), (BATCH_AXIS,))
    batch = PartitionSpec(BATCH_AXIS)

    def episode(actor_arrays, agent_index, covariates, key):
        actor_for_agent = join_static(actor_arrays, actor_description)
        params = env.covariates_to_params(covariates)
        actor = actor_for_agent(agent_index, covariates)
        return actor_episode_return(key, actor, env, params, max_steps)

    def local(actor_arrays, agent_index, covariates, keys):
        run = functools.partial(episode, actor_arrays)
        if chunk_size is None:
            return jax.vmap(run)(agent_index, covariates, keys)
        return jax.lax.map(lambda x: run(*x), (agent_index, covariates, keys),
                           batch_size=chunk_size)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), batch, batch, batch),
                            out_specs=batch,
                            # Nothing here communicates across devices; skip the
                            # varying-axis type checks that planner-state carries
                            # created inside the body would otherwise trip.
                            check_vma=False)
    replicated = NamedSharding(mesh, PartitionSpec())
    split = NamedSharding(mesh, batch)
    return jax.jit(sharded, in_shardings=(replicated, split, split, split), out_shardings=split)


def _global_array(values: np.ndarray, sharding) -> jax.Array:
    """A global array from host data that every process holds in full (works
    on one host and under `jax.distributed.initialize()`)."""
    return jax.make_array_from_callback(values.shape, sharding, lambda index: values[index])


def _check_options(values, num_episodes, max_steps, chunk_size) -> None:
    """ValueError naming a bad argument of `run_actor_episodes`."""
    if values.ndim != 2:
        raise ValueError(f"covariates: must have shape (A, {values.shape[-1]}); got {values.shape}")
    if not isinstance(num_episodes, (int, np.integer)) or num_episodes < 1:
        raise ValueError(f"num_episodes: must be a positive integer; got {num_episodes!r}")
    if not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise ValueError(f"max_steps: must be a positive integer; got {max_steps!r}")
    if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
        raise ValueError(f"chunk_size: must be a positive integer or None; got {chunk_size!r}")


def _episode_batch(key, values: np.ndarray, num_episodes: int, num_devices: int):
    """(agent_index (T,), covariates (T, P), key data (T, 2)) of the A · E
    episodes, agent-major, padded to a multiple of the devices with copies
    of the last."""
    num_agents = values.shape[0]
    total = num_agents * num_episodes
    padded = math.ceil(total / num_devices) * num_devices
    take = np.minimum(np.arange(padded), total - 1)      # pad with copies of the last
    agent_index = np.repeat(np.arange(num_agents, dtype=np.int32), num_episodes)[take]
    agent_covariates = np.repeat(values.astype(np.float32), num_episodes, axis=0)[take]
    keys = jax.random.split(key, total)
    if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
        keys = jax.random.key_data(keys)
    return agent_index, agent_covariates, np.asarray(keys)[take]


def run_actor_episodes(key: jax.Array, actor_for_agent, env, covariates, num_episodes: int, *,
                       max_steps: int | None = None, chunk_size: int | None = None,
                       devices: Sequence[jax.Device] | None = None,
                       allow_extrapolation: bool = False) -> np.ndarray:
    """(A, E) returns of episodes of every agent, each acting with
    `actor_for_agent(row () int, covariates (P,)) -> Actor`, in one compiled
    program (arguments as `run_episodes`; array leaves of a pytree
    `actor_for_agent` are passed as arguments)."""
    values = env.agents.validate(covariates, allow_extrapolation=allow_extrapolation)
    max_steps = env.max_episode_steps if max_steps is None else max_steps
    _check_options(values, num_episodes, max_steps, chunk_size)
    devices = tuple(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices: empty")
    if chunk_size is None and devices[0].platform == "cpu":
        chunk_size = 1

    batch = _episode_batch(key, values, num_episodes, len(devices))
    arrays, description = split_static(actor_for_agent)
    program = compiled_episodes(description, env, int(max_steps),
                                None if chunk_size is None else int(chunk_size), devices)
    mesh = Mesh(np.asarray(devices), (BATCH_AXIS,))
    split = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    inputs = [_global_array(x, split) for x in batch]
    replicated = NamedSharding(mesh, PartitionSpec())
    arrays = [_global_array(np.asarray(x), replicated) for x in arrays]
    returns = program(arrays, *inputs)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        returns = multihost_utils.process_allgather(returns, tiled=True)
    num_agents = values.shape[0]
    returns = np.asarray(returns)[:num_agents * num_episodes]
    return returns.reshape(num_agents, num_episodes)


def run_episodes(
    key: jax.Array,
    planner: Planner,
    dynamics_for_agent: DynamicsForAgent,
    env,
    covariates,
    num_episodes: int,
    **options,
) -> np.ndarray:
    """Returns of MPC episodes of every agent, all in one compiled program.

    Episode e of agent a uses the key `jax.random.split(key, A * E)[a * E + e]`,
    whatever the devices and chunking, so results do not depend on them.

    Args:
      key: PRNG key.
      planner: a `planning.Planner` (e.g. `experiments.paper.planner(env)`).
      dynamics_for_agent: `(agent_index () int, covariates (P,)) -> dynamics`,
        e.g. `dynamics.simulator_dynamics_for_agent(simulator)` or
        `dynamics.true_env_dynamics_for_agent(env)`. Traced inside the
        program; array leaves of a pytree callable are passed as arguments.
      env: the environment (each agent stepped with its own physics).
      covariates: (A, P) the agents' covariates.
      num_episodes: E episodes per agent.
      max_steps: steps per episode; default `env.max_episode_steps`.
      chunk_size: episodes a device runs at once (`lax.map` over chunks of
        its share). None: 1 on CPU devices, where one episode at a time
        keeps a rollout step's activations in cache and is the fastest
        (vmapping 20 CartPole episodes at once is ~3x slower per plan on 2
        cores), and the whole share at once on accelerators. Peak memory is
        proportional to it (module docstring).
      devices: devices of the mesh; default all (`jax.devices()`, every
        process's under `jax.distributed.initialize()`).
      allow_extrapolation: accept covariates outside the paper's ranges.

    Returns:
      (A, E) float32 numpy array of undiscounted episode returns.
    """
    if not isinstance(planner, Planner):
        raise ValueError(f"planner: expected a planning.Planner; got {type(planner).__name__}")
    return run_actor_episodes(key, PlannerActorForAgent(planner, dynamics_for_agent), env,
                              covariates, num_episodes, **options)


def run_policy_episodes(key: jax.Array, policy_for_agent: PolicyForAgent, env, covariates,
                        num_episodes: int, **options) -> np.ndarray:
    """(A, E) returns of episodes where each agent acts with its own policy
    (model-free methods), in one compiled program: the `PolicyActor` of
    each agent's policy; same keys, options and sharding as `run_episodes`."""
    return run_actor_episodes(key, PolicyActorForAgent(policy_for_agent), env, covariates,
                              num_episodes, **options)
