"""Prediction error (open loop; docs/design.md, the decisions table).

    err = evaluation.prediction_error(key, simulator, env,
                                      policies.test_policy(env), env.test_agents)
    err.summary()          # {"rmse": [5], "rmse_std": [5], "r2_mean": [5], "r2_median": [5]}

The model is one input type: a `DynamicsForAgent` (a method's per-agent
dynamics, the contract of `run_episodes`). A `Simulator` is accepted too and
converted once, at the public functions, to its own forward pass
(`dynamics.simulator_dynamics_for_agent(simulator, agent_ids, fold=False)`).
The acting policy is a function `policy(key, obs)`, e.g.
`experiments.datagen.policies.test_policy`.

Episode e of covariate row a uses the key fold_in(fold_in(key, a), e), and
its step i the key fold_in(run key, i): an episode depends neither on
num_episodes nor on warmup / horizon (only its length does), and
`prediction_trajectories(key, ...)` plays exactly episode 0 of
`prediction_error(key, ...)` for every agent.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from persim_jax.dynamics import (
    SimulatorDynamicsForAgent,
    contextual,
    simulator_dynamics_for_agent,
)
from persim_jax.persim.simulator import Simulator
from persim_jax.types import DynamicsForAgent, Policy


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


def _as_dynamics_for_agent(model, num_rows: int, agent_ids) -> DynamicsForAgent:
    """`model` itself, or a `Simulator` as its own forward pass for the rows."""
    if not isinstance(model, Simulator):
        if agent_ids is not None:
            raise ValueError("agent_ids: only for a Simulator; a dynamics_for_agent maps rows "
                             "to agents itself")
        return model
    ids = np.arange(num_rows) if agent_ids is None else np.asarray(agent_ids)
    if ids.shape != (num_rows,) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"agent_ids: must be {num_rows} integers (one per row of covariates); "
                         f"got {np.asarray(agent_ids).tolist() if agent_ids is not None else None}")
    # Static fields that do not change the computation: dropped so that they
    # do not make a new compiled program.
    simulator = model.replace(rank_losses=None, agent_keys=None)
    return simulator_dynamics_for_agent(simulator, ids, fold=False)


def _prediction_inputs(model, env, covariates, agent_ids, allow_extrapolation, **counts):
    """Validated (dynamics_for_agent, covariates) for the programs."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}: must be a positive integer; got {value!r}")
    values = env.agents.validate(covariates, allow_extrapolation=allow_extrapolation)
    if values.ndim != 2 or values.shape[0] < 1:
        raise ValueError(f"covariates: must have shape (A, {values.shape[-1]}) with A >= 1; "
                         f"got {values.shape}")
    dynamics_for_agent = _as_dynamics_for_agent(model, values.shape[0], agent_ids)
    if isinstance(dynamics_for_agent, SimulatorDynamicsForAgent):
        dynamics_for_agent.check(env, values.shape[0])
    return dynamics_for_agent, jnp.asarray(values, jnp.float32)


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
      model: a `DynamicsForAgent` `(row, covariates (P,)) -> dynamics(obs
        (M, B, D), action (B, ...)) -> (M, B, D)` or a `ContextualDynamics`
        (its context observes the warm-up's real transitions, then stays
        fixed for the open loop), e.g.
        `dynamics.simulator_dynamics_for_agent(ensemble, ids, fold=False)`;
        or a `persim_jax.Simulator` (its own forward pass).
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
