"""MPC episodes: every (agent, episode) pair played out in one compiled program.

    planner = experiments.paper.planner(env)     # or planning.make_planner(config, env)
    returns = evaluation.run_episodes(
        key, planner, evaluation.simulator_dynamics_for_agent(simulator), env,
        env.test_agents, num_episodes=20)                      # (5, 20)

One episode is a `lax.scan` over the env's steps with the planner inside (the
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
import warnings
from typing import Any, Callable, NamedTuple, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from persim_jax import planning
from persim_jax.model import Simulator

# (row () int, covariates (P,)) -> that agent's dynamics: a `planning.Dynamics`
# or a `ContextualDynamics`.
DynamicsForAgent = Callable[[jax.Array, jax.Array], Any]
# policy(key, obs (D,)) -> action (() int32 or (A,) float32): who acts in the
# prediction protocol (the paper's test policy); a pytree callable so that its
# parameters are arguments of the compiled program.
Policy = Callable[[jax.Array, jax.Array], jax.Array]
# (row () int, covariates (P,)) -> that agent's policy: a model-free method's
# counterpart of DynamicsForAgent.
PolicyForAgent = Callable[[jax.Array, jax.Array], Policy]

BATCH_AXIS = "episodes"


# ---------------------------------------------------------------------------
# Dynamics that adapt to the episode's history (CaDM)


@runtime_checkable
class ContextualDynamics(Protocol):
    """A model whose predictions depend on what the agent did so far in the
    episode (CaDM's context from its latest transitions), for the protocols.

    A `dynamics_for_agent` may return one instead of a plain `Dynamics`. The
    episode loops then carry its context: `init` at the reset, `observe`
    after every real transition (`run_episodes`: each env step; the
    prediction protocol: the teacher-forced warm-up steps only, after which
    the context stays fixed for the open loop), and plan or predict on
    `dynamics(context)`. All three are traced inside the compiled programs.
    """

    def init(self, key: jax.Array) -> Any:
        """The context at the start of an episode (a pytree of arrays);
        `key`: the episode's randomness for a stochastic model."""

    def observe(self, context: Any, obs: jax.Array, action: jax.Array,
                next_obs: jax.Array) -> Any:
        """The context after the real transition obs (D,), action, next_obs (D,)."""

    def dynamics(self, context: Any) -> planning.Dynamics:
        """The dynamics (the contract of `planning`) under `context`."""


class _Fixed(NamedTuple):
    """A plain dynamics (or, for `POLICY_ACTOR`, a policy) as a
    `ContextualDynamics` whose context is empty."""

    fixed: Any

    def init(self, key):
        return ()

    def observe(self, context, obs, action, next_obs):
        return context

    def dynamics(self, context):
        return self.fixed


def contextual(dynamics) -> ContextualDynamics:
    """`dynamics` itself if it is a `ContextualDynamics`, else a wrapper
    with an empty context."""
    if isinstance(dynamics, ContextualDynamics):
        return dynamics
    return _Fixed(dynamics)


# ---------------------------------------------------------------------------
# Dynamics of one agent, for `run_episodes`


@struct.dataclass
class SimulatorDynamicsForAgent:
    """Agent index -> that agent's learned dynamics (all M members).

    A pytree, so `run_episodes` passes the simulator's parameters to the
    compiled program as arguments (not as baked-in constants).

    Attributes:
      simulator: the trained `Simulator` (or any ensemble with its
        `predict` / `predict_members`).
      agent_ids: (A,) simulator agent index of each row of the covariates
        given to `run_episodes`, or None when row i is simulator agent i (the
        test agents are dataset units 0..4).
      fold: plan on `planning.simulator_dynamics`, the forward pass with the
        agent factor and the normalisation folded into the weights (faster;
        equal to float32 rounding); False runs `Simulator.predict_members`
        as it is (the prediction protocol's choice: its errors are the
        model's own).
    """

    simulator: Any
    agent_ids: jax.Array | None = None
    fold: bool = struct.field(pytree_node=False, default=True)

    def __call__(self, agent_index, covariates) -> planning.Dynamics:
        del covariates  # the simulator knows the agent by its id only
        agent = agent_index if self.agent_ids is None else self.agent_ids[agent_index]
        if self.fold:
            return planning.simulator_dynamics(self.simulator, agent)
        simulator = self.simulator

        def dynamics(obs, action):
            if obs.ndim == 3:
                return simulator.predict_members(agent, obs, action)
            return simulator.predict(agent, obs, action)

        return dynamics


def simulator_dynamics_for_agent(simulator, agent_ids: Sequence[int] | None = None, *,
                                 fold: bool = True) -> SimulatorDynamicsForAgent:
    """`dynamics_for_agent` of a learned simulator (PerSim's planning).

    Args:
      simulator: a `persim_jax.Simulator`.
      agent_ids: simulator agent index of each evaluated agent (row of
        `covariates`); default: row i is agent i.
      fold: see `SimulatorDynamicsForAgent`.
    """
    if agent_ids is not None:
        ids = np.asarray(agent_ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"agent_ids: must be a 1-d integer sequence; got {agent_ids!r}")
        if ids.size and (ids.min() < 0 or ids.max() >= simulator.num_agents):
            raise ValueError(f"agent_ids: must be in 0..{simulator.num_agents - 1}; got "
                             f"{ids.tolist()}")
        agent_ids = jnp.asarray(ids, jnp.int32)
    return SimulatorDynamicsForAgent(simulator, agent_ids, fold)


@struct.dataclass
class TrueEnvDynamicsForAgent:
    """Agent covariates -> the true env's dynamics with that agent's physics
    (one member; see `planning.env_dynamics`, `HeterogeneousEnv.state_from_obs`).

    Equal for equal envs, so repeated `run_episodes` calls reuse one compiled
    program."""

    env: Any = struct.field(pytree_node=False)

    def __call__(self, agent_index, covariates) -> planning.Dynamics:
        del agent_index
        return planning.env_dynamics(self.env, self.env.covariates_to_params(covariates))


def true_env_dynamics_for_agent(env) -> TrueEnvDynamicsForAgent:
    """`dynamics_for_agent` of the true environment ("True env + MPC"): each
    agent's own physics from its covariates, one member."""
    return TrueEnvDynamicsForAgent(env)


# ---------------------------------------------------------------------------
# Episodes


def episode_return(key, planner: planning.Planner, dynamics: planning.Dynamics, env, params,
                   max_steps: int) -> jax.Array:
    """() return of one MPC episode of one agent (jittable, vmappable).

    The env is reset with `key`, then for `max_steps` steps the planner plans
    from the true observation and the env steps (`env.step_env`, no auto
    reset) with the agent's physics `params`. Rewards are summed until the
    first termination; the scan runs on (its later steps are ignored), so
    that episodes of a batch stay in lock step. A `ContextualDynamics`
    observes every real transition.
    """
    reset_key, run_key = jax.random.split(key)
    obs, state = env.reset(reset_key, params)
    model = contextual(dynamics)

    def step(carry, key):
        obs, state, plan_state, context, total, done = carry
        plan_key, step_key = jax.random.split(key)
        action, plan_state = planner.plan(plan_key, plan_state, obs, model.dynamics(context))
        next_obs, state, reward, terminated, _ = env.step_env(step_key, state, action, params)
        context = model.observe(context, obs, action, next_obs)
        total = total + jnp.where(done, 0.0, reward)
        done = done | terminated
        return (next_obs, state, plan_state, context, total, done), None

    # The context's key is folded from the episode's, so that the reset and
    # step keys stay those of models without a context.
    carry = (obs, state, planner.init(), model.init(jax.random.fold_in(key, 1)),
             jnp.zeros((), jnp.float32), jnp.array(False))
    (*_, total, _), _ = jax.lax.scan(step, carry, jax.random.split(run_key, max_steps))
    return total


def _split_static(tree):
    """(array leaves, static description) of a pytree whose leaves may be
    functions: arrays become arguments of the compiled program."""
    leaves, treedef = jax.tree.flatten(tree)
    is_array = tuple(isinstance(leaf, (jax.Array, np.ndarray, np.generic)) for leaf in leaves)
    arrays = [leaf for leaf, a in zip(leaves, is_array) if a]
    static = tuple(None if a else leaf for leaf, a in zip(leaves, is_array))
    return arrays, (treedef, static)


def _join_static(arrays, description):
    treedef, static = description
    arrays = iter(arrays)
    return jax.tree.unflatten(treedef, [next(arrays) if s is None else s for s in static])


@functools.lru_cache(maxsize=32)
def _compiled_episodes(planner, dynamics_description, env, max_steps, chunk_size, devices):
    """The jitted, sharded program: (dynamics arrays, agent_index (T,),
    covariates (T, P), keys (T, 2)) -> returns (T,), T a multiple of the
    number of devices; cached per static configuration."""
    mesh = Mesh(np.asarray(devices), (BATCH_AXIS,))
    batch = PartitionSpec(BATCH_AXIS)

    def episode(dynamics_arrays, agent_index, covariates, key):
        dynamics_for_agent = _join_static(dynamics_arrays, dynamics_description)
        params = env.covariates_to_params(covariates)
        dynamics = dynamics_for_agent(agent_index, covariates)
        return episode_return(key, planner, dynamics, env, params, max_steps)

    def local(dynamics_arrays, agent_index, covariates, keys):
        run = functools.partial(episode, dynamics_arrays)
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


def run_episodes(
    key: jax.Array,
    planner: planning.Planner,
    dynamics_for_agent: DynamicsForAgent,
    env,
    covariates,
    num_episodes: int,
    *,
    max_steps: int | None = None,
    chunk_size: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    allow_extrapolation: bool = False,
) -> np.ndarray:
    """Returns of MPC episodes of every agent, all in one compiled program.

    Episode e of agent a uses the key `jax.random.split(key, A * E)[a * E + e]`,
    whatever the devices and chunking, so results do not depend on them.

    Args:
      key: PRNG key.
      planner: a `planning.Planner` (e.g. `experiments.paper.planner(env)`).
      dynamics_for_agent: `(agent_index () int, covariates (P,)) -> dynamics`,
        e.g. `simulator_dynamics_for_agent(simulator)` or
        `true_env_dynamics_for_agent(env)`. Traced inside the program; array
        leaves of a pytree callable are passed as arguments.
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
    values = env.agents.validate(covariates, allow_extrapolation=allow_extrapolation)
    if values.ndim != 2:
        raise ValueError(f"covariates: must have shape (A, {values.shape[-1]}); got {values.shape}")
    if not isinstance(num_episodes, (int, np.integer)) or num_episodes < 1:
        raise ValueError(f"num_episodes: must be a positive integer; got {num_episodes!r}")
    max_steps = env.max_episode_steps if max_steps is None else max_steps
    if not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise ValueError(f"max_steps: must be a positive integer; got {max_steps!r}")
    if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
        raise ValueError(f"chunk_size: must be a positive integer or None; got {chunk_size!r}")
    if not isinstance(planner, planning.Planner):
        raise ValueError(f"planner: expected a planning.Planner; got {type(planner).__name__}")
    devices = tuple(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices: empty")
    if chunk_size is None and devices[0].platform == "cpu":
        chunk_size = 1

    num_agents = values.shape[0]
    total = num_agents * num_episodes
    padded = math.ceil(total / len(devices)) * len(devices)
    take = np.minimum(np.arange(padded), total - 1)      # pad with copies of the last
    agent_index = np.repeat(np.arange(num_agents, dtype=np.int32), num_episodes)[take]
    agent_covariates = np.repeat(values.astype(np.float32), num_episodes, axis=0)[take]
    keys = jax.random.split(key, total)
    if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
        keys = jax.random.key_data(keys)
    keys = np.asarray(keys)[take]

    arrays, description = _split_static(dynamics_for_agent)
    program = _compiled_episodes(planner, description, env, int(max_steps),
                                 None if chunk_size is None else int(chunk_size), devices)
    mesh = Mesh(np.asarray(devices), (BATCH_AXIS,))
    split = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    inputs = [_global_array(x, split) for x in (agent_index, agent_covariates, keys)]
    replicated = NamedSharding(mesh, PartitionSpec())
    arrays = [_global_array(np.asarray(x), replicated) for x in arrays]
    returns = program(arrays, *inputs)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        returns = multihost_utils.process_allgather(returns, tiled=True)
    returns = np.asarray(returns)[:total]
    return returns.reshape(num_agents, num_episodes)


def _no_plan_state():
    return ()


def _act(key, state, obs, policy):
    """A `Planner.plan` that asks the agent's policy instead of planning."""
    return policy(key, obs), state


# The "planner" of model-free methods: its dynamics slot holds the agent's
# policy. One module-level object, so that `run_episodes`' compiled programs
# are cached across calls.
POLICY_ACTOR = planning.Planner(_no_plan_state, _act, None)


def run_policy_episodes(key: jax.Array, policy_for_agent: PolicyForAgent, env, covariates,
                        num_episodes: int, **options) -> np.ndarray:
    """(A, E) returns of episodes where each agent acts with its own policy
    (model-free methods), in one compiled program: `run_episodes` with the
    policy in place of the planner; same keys, options and sharding."""
    return run_episodes(key, POLICY_ACTOR, policy_for_agent, env, covariates, num_episodes,
                        **options)


# ---------------------------------------------------------------------------
# Prediction error (open loop; docs/design.md, the decisions table)
#
#     err = evaluation.prediction_error(key, simulator, env,
#                                       policies.test_policy(env), env.test_agents)
#     err.summary()          # {"rmse": [5], "rmse_std": [5], "r2_mean": [5], "r2_median": [5]}
#
# The model is any `dynamics_for_agent` (a method's per-agent dynamics, the
# contract of `run_episodes`) or a `Simulator`, whose own forward pass is then
# used (`SimulatorDynamicsForAgent(fold=False)`). The acting policy is a
# function `policy(key, obs)`, e.g. `experiments.datagen.policies.test_policy`.
#
# Episode e of covariate row a uses the key fold_in(fold_in(key, a), e), and
# its step i the key fold_in(run key, i): an episode depends neither on
# num_episodes nor on warmup / horizon (only its length does), and
# `prediction_trajectories(key, ...)` plays exactly episode 0 of
# `prediction_error(key, ...)` for every agent.


@struct.dataclass
class PredictionError:
    """Per-episode open-loop prediction errors.

    Attributes:
      rmse: (A, E) RMSE in raw units over the valid window states and all
        dimensions; NaN when no window state is valid.
      r2: (A, E) variance-weighted R² (time as samples): 1 - Σ_j SS_res,j /
        Σ_j SS_tot,j over the valid window states; NaN when fewer than 2 are
        valid or SS_tot is 0.
    """

    rmse: np.ndarray
    r2: np.ndarray

    def summary(self) -> dict[str, list[float]]:
        """Per agent: mean and std (ddof 0) of the RMSE, mean and median of R²,
        ignoring NaN episodes (NaN where an agent has none scored)."""
        rmse, r2 = np.asarray(self.rmse, np.float64), np.asarray(self.r2, np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN rows
            out = {"rmse": np.nanmean(rmse, axis=1), "rmse_std": np.nanstd(rmse, axis=1),
                   "r2_mean": np.nanmean(r2, axis=1), "r2_median": np.nanmedian(r2, axis=1)}
        return {name: [float(x) for x in values] for name, values in out.items()}


def _num_members(dynamics, policy, obs) -> int:
    """M of `dynamics`, from the shape it would return (nothing is computed)."""
    action = jax.eval_shape(policy, jax.random.PRNGKey(0), obs)
    out = jax.eval_shape(lambda o, a: dynamics(o[None], a[None]), obs,
                         jax.ShapeDtypeStruct(action.shape, action.dtype))
    return out.shape[0]


def _prediction_episode(env, warmup, horizon, dynamics, policy, env_params, key):
    """One episode of one agent: (true (W, D), member predictions (M, W, D),
    valid (W,)) over the scored window, W = horizon + 1."""
    reset_key, run_key = jax.random.split(key)
    obs, state = env.reset(reset_key, env_params)
    obs = obs.astype(jnp.float32)
    model = contextual(dynamics)
    context = model.init(jax.random.fold_in(key, 1))
    members = jnp.broadcast_to(
        obs, (_num_members(model.dynamics(context), policy, obs), *obs.shape))

    def step(carry, i):
        """Produces state i + 1 and every member's prediction of it."""
        obs, state, members, context, alive = carry
        policy_key, env_key = jax.random.split(jax.random.fold_in(run_key, i))
        action = policy(policy_key, obs)
        next_obs, state, _, terminated, _ = env.step_env(env_key, state, action, env_params)
        next_obs = next_obs.astype(jnp.float32)
        # Teacher forcing for the first `warmup` predictions, then each member's own open loop.
        source = jnp.where(i < warmup, jnp.broadcast_to(obs, members.shape), members)
        members = model.dynamics(context)(source[:, None], action[None])[:, 0]
        # A context sees the real transitions of the warm-up only: the one
        # before the last teacher-forced prediction is the last it observes,
        # and the open loop runs on that context (docs/design.md).
        observed = model.observe(context, obs, action, next_obs)
        context = jax.tree.map(lambda new, old: jnp.where(i < warmup - 1, new, old),
                               observed, context)
        valid = alive & (i + 1 <= env.max_episode_steps)   # state i + 1 exists
        return (next_obs, state, members, context, alive & ~terminated), (next_obs, members, valid)

    carry = (obs, state, members, context, jnp.array(True))
    _, (true, predicted, valid) = jax.lax.scan(step, carry, jnp.arange(warmup + horizon))
    start = warmup - 1                            # scan output j is state j + 1
    return true[start:], jnp.moveaxis(predicted[start:], 0, 1), valid[start:]


def _episode_metrics(true, predicted, valid):
    """() RMSE and variance-weighted R² of one episode's window."""
    n = jnp.sum(valid)
    mask = valid[:, None]
    squared = jnp.where(mask, (predicted - true) ** 2, 0.0)
    ss_res = jnp.sum(squared)
    rmse = jnp.where(n > 0, jnp.sqrt(ss_res / jnp.maximum(n * true.shape[-1], 1)), jnp.nan)
    mean = jnp.sum(jnp.where(mask, true, 0.0), axis=0) / jnp.maximum(n, 1)
    ss_tot = jnp.sum(jnp.where(mask, (true - mean) ** 2, 0.0))
    defined = (n >= 2) & (ss_tot > 0)
    r2 = jnp.where(defined, 1.0 - ss_res / jnp.where(defined, ss_tot, 1.0), jnp.nan)
    return rmse, r2


def _agent_episodes(env, warmup, horizon, num_episodes, dynamics_for_agent, policy, key,
                    row, covariates):
    """Window arrays of E episodes of one agent (vmapped over episodes)."""
    env_params = env.covariates_to_params(covariates)
    dynamics = dynamics_for_agent(row, covariates)
    agent_key = jax.random.fold_in(key, row)
    keys = jax.vmap(lambda e: jax.random.fold_in(agent_key, e))(jnp.arange(num_episodes))
    return jax.vmap(lambda k: _prediction_episode(env, warmup, horizon, dynamics, policy,
                                                  env_params, k))(keys)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _prediction_error_jit(env, warmup, horizon, num_episodes, dynamics_for_agent, policy,
                          covariates, key):
    """(A, E) RMSE and R²; agents one at a time (`lax.map`), episodes vmapped."""
    def agent(x):
        windows = _agent_episodes(env, warmup, horizon, num_episodes, dynamics_for_agent, policy,
                                  key, *x)
        true, members, valid = windows
        return jax.vmap(_episode_metrics)(true, members.mean(axis=1), valid)

    rows = jnp.arange(covariates.shape[0])
    return jax.lax.map(agent, (rows, covariates))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _prediction_trajectories_jit(env, warmup, horizon, dynamics_for_agent, policy, covariates,
                                 key):
    """Episode 0 of every agent: true (A, W, D), member mean (A, W, D), members
    (A, M, W, D), valid (A, W)."""
    def agent(row, cov):
        windows = _agent_episodes(env, warmup, horizon, 1, dynamics_for_agent, policy, key,
                                  row, cov)
        true, members, valid = jax.tree.map(lambda x: x[0], windows)
        return true, members.mean(axis=0), members, valid

    return jax.vmap(agent)(jnp.arange(covariates.shape[0]), covariates)


def _prediction_inputs(model, env, covariates, agent_ids, allow_extrapolation, **counts):
    """Validated (dynamics_for_agent, covariates) for the programs."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}: must be a positive integer; got {value!r}")
    values = env.agents.validate(covariates, allow_extrapolation=allow_extrapolation)
    if values.ndim != 2 or values.shape[0] < 1:
        raise ValueError(f"covariates: must have shape (A, {values.shape[-1]}) with A >= 1; "
                         f"got {values.shape}")
    covariates = jnp.asarray(values, jnp.float32)
    if not hasattr(model, "predict_members"):         # a method's dynamics_for_agent
        if agent_ids is not None:
            raise ValueError("agent_ids: only for a Simulator; a dynamics_for_agent maps rows "
                             "to agents itself")
        return model, covariates
    simulator = model
    if simulator.obs_dim != env.obs_dim:
        raise ValueError(f"simulator: predicts {simulator.obs_dim}-d states; {env.name} has "
                         f"{env.obs_dim}")
    if simulator.config.discrete != bool(env.discrete_actions):
        raise ValueError(f"simulator: its action type (discrete={simulator.config.discrete}) "
                         f"does not match {env.name}'s")
    num_agents = values.shape[0]
    ids = np.arange(num_agents) if agent_ids is None else np.asarray(agent_ids)
    if ids.shape != (num_agents,) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"agent_ids: must be {num_agents} integers (one per row of covariates); "
                         f"got {np.asarray(agent_ids).tolist() if agent_ids is not None else None}")
    if ids.min() < 0 or ids.max() >= simulator.num_agents:
        raise ValueError(f"agent_ids: must be in 0..{simulator.num_agents - 1}; got "
                         f"{ids.tolist()}")
    # Static fields that do not change the computation: dropped so that they
    # do not make a new compiled program.
    if isinstance(simulator, Simulator):
        simulator = simulator.replace(rank_losses=None, agent_keys=None)
    return (SimulatorDynamicsForAgent(simulator, jnp.asarray(ids, jnp.int32), fold=False),
            covariates)


def prediction_error(key: jax.Array, model, env, policy: Policy, covariates, agent_ids=None,
                     *, num_episodes: int = 200, warmup: int = 10, horizon: int = 50,
                     allow_extrapolation: bool = False) -> PredictionError:
    """The paper's open-loop prediction error (docs/design.md).

    Per agent, E episodes of `policy` acting on the true observation in the
    true env with the agent's physics, warmup + horizon steps. Each member
    predicts one step from the true state for the first `warmup` steps, then
    runs its own open loop on its predictions with the true actions; the
    ensemble prediction is the member mean. Scored: states warmup..warmup +
    horizon (the first a one-step prediction), up to the episode's
    termination (terminal state included). All agents and episodes run in one
    compiled program.

    Args:
      key: PRNG key; episode e of row a uses fold_in(fold_in(key, a), e).
      model: a `persim_jax.Simulator` (or an ensemble with its
        `predict_members`), or a method's `dynamics_for_agent(row, covariates
        (P,)) -> dynamics(obs (M, B, D), action (B, ...)) -> (M, B, D)` or a
        `ContextualDynamics` (its context observes the warm-up's real
        transitions, then stays fixed for the open loop).
      env: the environment.
      policy: `policy(key, obs (D,)) -> action`, ONE policy for every agent
        (the paper's test policy: `experiments.datagen.policies.test_policy`).
      covariates: (A, P) the agents' covariates (their true physics).
      agent_ids: (A,) simulator agent index of each row (a Simulator only);
        default 0..A-1.
      num_episodes: E episodes per agent.
      warmup: teacher-forced steps before the window (≥ 1).
      horizon: open-loop steps scored after the first one (window horizon + 1).
      allow_extrapolation: accept covariates outside the paper's ranges.

    Returns:
      `PredictionError` with (A, E) float64 `rmse` and `r2`.
    """
    dynamics_for_agent, values = _prediction_inputs(
        model, env, covariates, agent_ids, allow_extrapolation,
        num_episodes=num_episodes, warmup=warmup, horizon=horizon)
    rmse, r2 = _prediction_error_jit(env, int(warmup), int(horizon), int(num_episodes),
                                     dynamics_for_agent, policy, values, key)
    return PredictionError(rmse=np.asarray(rmse, np.float64), r2=np.asarray(r2, np.float64))


def prediction_trajectories(key: jax.Array, model, env, policy: Policy, covariates,
                            agent_ids=None, *, warmup: int = 10, horizon: int = 50,
                            allow_extrapolation: bool = False) -> dict[str, np.ndarray]:
    """One episode per agent of `prediction_error`'s protocol, for plots: the
    same episode as its episode 0 for the same key (arguments as there).

    Returns:
      {"true": (A, W, D), "predicted": (A, W, D) member mean, "members":
      (A, M, W, D), "valid": (A, W) bool}, W = horizon + 1 scored states;
      invalid states (after termination) are kept as computed, not NaN.
    """
    dynamics_for_agent, values = _prediction_inputs(
        model, env, covariates, agent_ids, allow_extrapolation, warmup=warmup, horizon=horizon)
    true, predicted, members, valid = _prediction_trajectories_jit(
        env, int(warmup), int(horizon), dynamics_for_agent, policy, values, key)
    return {"true": np.asarray(true), "predicted": np.asarray(predicted),
            "members": np.asarray(members), "valid": np.asarray(valid, bool)}
