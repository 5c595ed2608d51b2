"""New agents added to a trained simulator in closed form, without retraining.

PerSim's prediction is linear in the agent factor (paper, §5):

    Δŝ_d(n, s, a) = Σ_ℓ u_ℓ(n) · v_ℓ(s, d) · w_ℓ(a) = x(s, a, d) · u(n),

with x_ℓ(s, a, d) = v_ℓ(s, d) w_ℓ(a) computed by the frozen state and action
encoders. A new agent's K transitions give K·D linear equations x · u = y in
its r unknowns (y: the Δ targets in the model's space, i.e. standardised when
the simulator standardises). Per ensemble member we take the MAP estimate
under a Gaussian prior fitted to the training agents' factors,

    u* = argmin_u  Σ_{t,d} (x_td · u − y_td)² + λ (u − μ)ᵀ Σ⁻¹ (u − μ),       (1)

μ, Σ the mean and covariance (ddof 0) of the member's N training factors and
λ the member's noise variance per equation (its validation MSE, the same
quantity in the same space) unless given. With one or two transitions (fewer
equations than unknowns) the prior fills the undetermined directions instead
of leaving a singular system; with many, the data dominate.

(1) is solved in whitened coordinates u = μ + Σ^{1/2} z, where the penalty
is λ‖z‖² and a singular Σ (e.g. a population simulator: one agent) needs no
inverse: directions in which the training factors do not vary stay at μ. The
whitened system is diagonalised (`eigh`); directions that the data determine
below float32 precision (`RELATIVE_CURVATURE_CUTOFF`) also stay at μ, which
matters when λ is tiny (a raw-units model with a small validation MSE).

    simulator = persim_jax.fit(transitions, rank=5, key=key)
    newcomers = persim_jax.load_csv("new_patients.csv", map_agent_ids=True)
    bigger = simulator.add_agents(newcomers)     # agents N..N+K-1 are the new ones

Everything is vmapped over members and new agents; the transitions are
reduced to per-agent normal equations (r × r) in chunks (`lax.scan`), so
memory does not grow with the number of transitions.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from persim_jax.persim import model as model_lib
from persim_jax.data import Transitions, validate_transitions

# Noise variance used as λ when a member has no validation loss (trained with
# validation_fraction=0): the scale of a well-fitted standardised model.
DEFAULT_RIDGE = 1e-3
# Directions of the whitened normal equations whose curvature is below this
# share of the largest are left at the prior: float32 normal equations carry
# rounding of about 1e-7 of their scale in every direction, so there the data
# do not determine the factor, rounding would. (Raw CartPole's validation MSE,
# ~1e-8 as λ, gave NaN factors from 20 pure-policy transitions without it.)
RELATIVE_CURVATURE_CUTOFF = 1e-6
# Transitions reduced to normal equations at once (bounds the (chunk, D, r)
# features and the state encoder's activations).
CHUNK = 2048


def factor_prior(simulator) -> tuple[jax.Array, jax.Array]:
    """The training agents' factor distribution of every member.

    Returns:
      (mean (M, r), root (M, r, r)): the mean of the N training factors and
      the symmetric square root of their covariance (ddof 0; eigenvalues
      below 0 from rounding clipped to 0).
    """
    factors = simulator.agent_factors(member=None)                     # (M, N, r)
    mean = factors.mean(axis=1)
    centred = factors - mean[:, None, :]
    covariance = jnp.einsum("mnr,mns->mrs", centred, centred) / factors.shape[1]

    def sqrt_psd(matrix):
        values, vectors = jnp.linalg.eigh(matrix)
        return (vectors * jnp.sqrt(jnp.clip(values, 0.0))) @ vectors.T

    return mean, jax.vmap(sqrt_psd)(covariance)


def default_ridge(simulator) -> jax.Array:
    """(M,) λ of each member: its validation MSE (the noise variance per
    equation of (1), in the model's space), `DEFAULT_RIDGE` where it has
    none."""
    loss = jnp.asarray(simulator.validation_loss, jnp.float32)
    return jnp.where(jnp.isfinite(loss) & (loss > 0), loss, DEFAULT_RIDGE)


@functools.partial(jax.jit, static_argnames=("config", "num_new"))
def normal_equations(params, stats, config: model_lib.ModelConfig, agent_id, obs, action,
                     next_obs, *, num_new: int) -> tuple[jax.Array, jax.Array]:
    """Σ_t Xₜᵀ Xₜ and Σ_t Xₜᵀ yₜ of every member and new agent.

    Args:
      params: the ensemble's parameters (leading axis M).
      stats: the simulator's normalisation statistics.
      config: the network's config.
      agent_id: (T,) int new-agent index in 0..num_new-1.
      obs, next_obs: (T, D) raw states.
      action: (T,) int or (T, A) float raw actions.
      num_new: K, the number of new agents.

    Returns:
      (gram (M, K, r, r), moment (M, K, r)), Xₜ = x(sₜ, aₜ, ·) (D, r) the
      factor features and yₜ (D,) the Δ target, both in the model's space.
    """
    count = obs.shape[0]
    chunks = -(-count // CHUNK)
    pad = chunks * CHUNK - count

    def padded(x):
        x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
        return x.reshape(chunks, CHUNK, *x.shape[1:])

    weight = padded(jnp.ones((count,), jnp.float32))
    rows = tuple(padded(x) for x in (agent_id, obs, action, next_obs))

    def member_sums(member_params, agent_id, obs, action, next_obs, weight):
        features = model_lib.factor_features(
            member_params, config, stats.normalize_obs(obs),
            stats.action_input(action, config.discrete))                   # (C, D, r)
        features = features * weight[:, None, None]        # padding rows add nothing
        target = stats.normalize_delta(next_obs - obs)                      # (C, D)
        gram = jnp.einsum("tdr,tds->trs", features, features)
        moment = jnp.einsum("tdr,td->tr", features, target)
        return (jax.ops.segment_sum(gram, agent_id, num_segments=num_new),
                jax.ops.segment_sum(moment, agent_id, num_segments=num_new))

    def accumulate(totals, chunk):
        sums = jax.vmap(member_sums, in_axes=(0, None, None, None, None, None))(params, *chunk)
        return jax.tree.map(jnp.add, totals, sums), None

    members = jax.tree.leaves(params)[0].shape[0]
    rank = config.rank
    zeros = (jnp.zeros((members, num_new, rank, rank), jnp.float32),
             jnp.zeros((members, num_new, rank), jnp.float32))
    totals, _ = jax.lax.scan(accumulate, zeros, (*rows, weight))
    return totals


@jax.jit
def solve_factors(gram, moment, mean, root, ridge) -> jax.Array:
    """The minimisers of (1) for every member and new agent.

    Args:
      gram: (M, K, r, r) Σ_t Xₜᵀ Xₜ.
      moment: (M, K, r) Σ_t Xₜᵀ yₜ.
      mean: (M, r) prior mean μ.
      root: (M, r, r) symmetric square root of the prior covariance Σ.
      ridge: (M,) λ.

    Returns:
      (M, K, r) the factors u* = μ + Σ^{1/2} z*, where
      (Σ^{1/2} G Σ^{1/2} + λ I) z* = Σ^{1/2} (b − G μ), solved in the
      eigenbasis of Σ^{1/2} G Σ^{1/2}; z* is 0 along eigenvalues below
      `RELATIVE_CURVATURE_CUTOFF` times the largest.
    """
    def one(gram, moment, mean, root, ridge):
        values, vectors = jnp.linalg.eigh(root @ gram @ root)
        rhs = vectors.T @ (root @ (moment - gram @ mean))
        determined = values > RELATIVE_CURVATURE_CUTOFF * values[-1]
        z = vectors @ jnp.where(determined, rhs / (jnp.where(determined, values, 0) + ridge), 0)
        return mean + root @ z

    per_agent = jax.vmap(one, in_axes=(0, 0, None, None, None))
    return jax.vmap(per_agent)(gram, moment, mean, root, ridge)


def fit_factors(simulator, transitions: Transitions, *, ridge=None) -> jax.Array:
    """The new agents' factors (1), without adding them.

    Args:
      simulator: a trained `Simulator`.
      transitions: K new agents' transitions, ids 0..K-1 (validated here).
      ridge: λ of (1): None (each member's validation MSE), a number, or
        (M,) one per member; positive.

    Returns:
      (M, K, r) factors u of each member and new agent.

    Raises:
      ValueError: naming the problem with the transitions or `ridge`.
    """
    check_newcomers(simulator, transitions)
    ridge = _ridge(simulator, ridge)
    gram, moment = normal_equations(
        simulator.params, simulator.stats, simulator.config,
        jnp.asarray(np.asarray(transitions.agent_id), jnp.int32),
        jnp.asarray(transitions.obs, jnp.float32),
        _actions(simulator, transitions),
        jnp.asarray(transitions.next_obs, jnp.float32), num_new=transitions.num_agents)
    mean, root = factor_prior(simulator)
    return solve_factors(gram, moment, mean, root, ridge)


def add_agents(simulator, transitions: Transitions, *, ridge=None):
    """The simulator with K new agents, their factors fitted in closed form.

    Args:
      simulator: a trained `Simulator` of N agents.
      transitions: the new agents' transitions, ids 0..K-1 (e.g. from
        `load_csv(..., map_agent_ids=True)`); at least one per agent.
      ridge: see `fit_factors`.

    Returns:
      A `Simulator` of N + K agents: agents 0..N-1 unchanged (their
      parameters and predictions identical bit for bit), new agent k is
      agent N + k. Agent keys: the old ones (or 0..N-1) followed by the new
      ones (or N..N+K-1), when either side has keys.

    Raises:
      ValueError: naming the problem (state dimension, action type or range,
        NaN/inf, an agent without transitions, a key already taken, ridge).
    """
    factors = fit_factors(simulator, transitions, ridge=ridge)           # (M, K, r)
    agent_keys = _agent_keys(simulator, transitions)
    encoder = simulator.params["agent_encoder"]
    # u(n) = kernel[n] + bias (a one-hot linear layer): the new rows hold
    # u − bias, the old rows and the bias are kept as they are.
    rows = factors - encoder["bias"][:, None, :]
    params = dict(simulator.params)
    params["agent_encoder"] = {"kernel": jnp.concatenate([encoder["kernel"], rows], axis=1),
                               "bias": encoder["bias"]}
    config = dataclasses.replace(simulator.config,
                                 num_agents=simulator.num_agents + transitions.num_agents)
    return simulator.replace(params=params, config=config, agent_keys=agent_keys)


# ---------------------------------------------------------------------------
# Validation at the edge


def check_newcomers(simulator, transitions) -> None:
    """Raises ValueError naming what makes `transitions` unusable as new
    agents of `simulator`."""
    if not isinstance(transitions, Transitions):
        raise ValueError(f"transitions: expected persim_jax.Transitions (e.g. from "
                         f"make_transitions or load_csv); got {type(transitions).__name__}")
    obs = np.asarray(transitions.obs)
    if obs.ndim == 2 and obs.shape[0] == 0:
        raise ValueError("transitions: no transitions; each new agent needs at least one")
    for name in ("obs", "next_obs"):
        shape = np.shape(getattr(transitions, name))
        if len(shape) == 2 and shape[1] != simulator.obs_dim:
            raise ValueError(f"transitions.{name}: states have {shape[1]} dimensions; the "
                             f"simulator predicts {simulator.obs_dim}-dimensional states")
    config = simulator.config
    if transitions.discrete != config.discrete:
        kinds = {True: "discrete", False: "continuous"}
        raise ValueError(f"transitions.action: {kinds[transitions.discrete]} actions; the "
                         f"simulator was trained on {kinds[config.discrete]} ones")
    action = np.asarray(transitions.action)
    if config.discrete:
        if action.ndim == 1 and action.size:
            bad = np.flatnonzero((action < 0) | (action >= config.num_actions))
            if bad.size:
                raise ValueError(f"transitions.action: row {bad[0]} has action "
                                 f"{action[bad[0]]}, outside the simulator's actions "
                                 f"0..{config.num_actions - 1}")
        # Loaders infer num_actions as max + 1: a newcomer that never took the
        # last action still fits. Check the values against the simulator's.
        transitions = transitions.replace(num_actions=config.num_actions)
    elif action.ndim == 2 and action.shape[1] != config.action_dim:
        raise ValueError(f"transitions.action: actions have {action.shape[1]} dimensions; the "
                         f"simulator takes {config.action_dim}")
    try:
        validate_transitions(transitions)
    except ValueError as error:
        raise ValueError(f"transitions (the new agents): {error}") from None


def _ridge(simulator, ridge) -> jax.Array:
    if ridge is None:
        return default_ridge(simulator)
    members = simulator.ensemble_size
    try:
        values = np.asarray(ridge, np.float64)
    except (TypeError, ValueError):
        values = np.full((0,), np.nan)
    if values.ndim == 0:
        values = np.full((members,), values)
    if values.shape != (members,) or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"ridge: a positive number or {members} positive numbers (one per "
                         f"member); got {ridge!r}")
    return jnp.asarray(values, jnp.float32)


def _actions(simulator, transitions) -> jax.Array:
    if simulator.config.discrete:
        return jnp.asarray(np.asarray(transitions.action), jnp.int32)
    return jnp.asarray(transitions.action, jnp.float32)


def _agent_keys(simulator, transitions) -> tuple | None:
    """Keys of the N + K agents, or None when neither side has any."""
    if simulator.agent_keys is None and transitions.agent_keys is None:
        return None
    old = (tuple(simulator.agent_keys) if simulator.agent_keys is not None
           else tuple(range(simulator.num_agents)))
    new = (tuple(transitions.agent_keys) if transitions.agent_keys is not None
           else tuple(range(simulator.num_agents, simulator.num_agents + transitions.num_agents)))
    taken = set(old).intersection(new)
    if taken:
        raise ValueError(f"transitions.agent_keys: {sorted(taken, key=str)[:5]} already name "
                         f"agents of the simulator; give the new agents other ids")
    return old + new
