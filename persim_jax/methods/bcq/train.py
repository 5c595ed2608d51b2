"""BCQ's policies (greedy / perturbed actions per agent, saved and loaded) and
their training: `fit`, chunks of `CHUNK_ITERATIONS` gradient steps in one
jitted program, vmapped over policies, resumable (`persim_jax.training`)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, struct

from persim_jax import checkpoints, training
from persim_jax.validation import positive_int
from persim_jax.methods.bcq.model import (
    BCQConfig,
    Batch,
    continuous_update,
    critic_values,
    decode,
    discrete_update,
    init_continuous,
    init_discrete,
    masked_q,
    perturb,
)
from persim_jax.data import Transitions, load_msgpack, save_msgpack, validate_transitions

FILE_FORMAT = "persim-jax-bcq"
CHECKPOINT_FORMAT = 1
# Iterations per jitted call: the granularity of progress and checkpoints.
CHUNK_ITERATIONS = 5_000

# ---------------------------------------------------------------------------
# Policies


@struct.dataclass
class DiscretePolicy:
    """policy(key, obs (D,)) -> () int32: the greedy masked argmax of Q."""

    params: Any
    threshold: float = struct.field(pytree_node=False)

    def __call__(self, key, obs):
        del key
        return jnp.argmax(masked_q(self.params, obs[None], self.threshold)[0]).astype(jnp.int32)


@struct.dataclass
class ContinuousPolicy:
    """policy(key, obs (D,)) -> (A,) float32: of `samples` decoded and
    perturbed actions, the one with the highest Q1."""

    params: Any
    phi: float = struct.field(pytree_node=False)
    max_action: float = struct.field(pytree_node=False)
    samples: int = struct.field(pytree_node=False)

    def __call__(self, key, obs):
        obs = jnp.broadcast_to(obs, (self.samples, obs.shape[-1]))
        sampled = decode(self.params["vae"], obs, key, self.max_action)
        action = perturb(self.params["actor"], obs, sampled, self.phi, self.max_action)
        q1, _ = critic_values(self.params["critic"], obs, action)
        return action[jnp.argmax(q1)]


@struct.dataclass
class BCQPolicyForAgent:
    """(row, covariates) -> the policy of row `row`: stacked policy `index[row]`."""

    policies: Any       # a DiscretePolicy / ContinuousPolicy, params with a leading K axis
    index: jax.Array    # (A,) int32

    def __call__(self, row, covariates):
        del covariates
        return jax.tree.map(lambda leaf: leaf[self.index[row]], self.policies)


@struct.dataclass
class BCQPolicies:
    """What BCQ trained: K policies' acting parameters, stacked.

    Attributes:
      params: every leaf with a leading K axis; discrete {"q", "g"},
        continuous {"vae", "actor", "critic"}.
      config: the resolved `BCQConfig` it was trained with.
      agent_ids: BCQ-A: the agent of each of the K policies; BCQ-P: None
        (one policy, K = 1, for every agent).
    """

    params: Any
    config: BCQConfig = struct.field(pytree_node=False)
    agent_ids: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)

    @property
    def discrete(self) -> bool:
        return "q" in self.params

    def stacked_policy(self):
        """The K policies as one policy pytree whose params keep the K axis."""
        if self.discrete:
            return DiscretePolicy(self.params, self.config.threshold)
        return ContinuousPolicy(self.params, self.config.phi, self.config.max_action,
                                self.config.acting_samples)

    def policy(self, index: int):
        """The policy of stacked row `index`: `policy(key, obs) -> action`."""
        return jax.tree.map(lambda leaf: leaf[index], self.stacked_policy())

    def policy_for_agent(self, agent_ids: Sequence[int]) -> BCQPolicyForAgent:
        """Row i -> agent `agent_ids[i]`'s policy (BCQ-P: the one policy)."""
        ids = [int(a) for a in agent_ids]
        if self.agent_ids is None:
            index = [0] * len(ids)
        else:
            missing = sorted(set(ids) - set(self.agent_ids))
            if missing:
                raise ValueError(f"agent_ids: no policy was trained for agents {missing}; "
                                 f"trained: {list(self.agent_ids)}")
            index = [self.agent_ids.index(a) for a in ids]
        return BCQPolicyForAgent(self.stacked_policy(), jnp.asarray(index, jnp.int32))

    def save(self, path: str | os.PathLike) -> None:
        """Writes one msgpack file atomically."""
        payload = {"format": FILE_FORMAT, "config": self.config.to_dict(),
                   "agent_ids": None if self.agent_ids is None else list(self.agent_ids),
                   "params": jax.tree.map(np.asarray, serialization.to_state_dict(self.params))}
        save_msgpack(path, payload)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BCQPolicies":
        payload = load_msgpack(path, FILE_FORMAT, "a file of BCQ policies")
        ids = payload["agent_ids"]
        return cls(params=jax.tree.map(jnp.asarray, payload["params"]),
                   config=BCQConfig(**payload["config"]),
                   agent_ids=None if ids is None else tuple(int(a) for a in ids))


# ---------------------------------------------------------------------------
# Training


@struct.dataclass
class PolicyData:
    """Each policy's transitions: `rows`, a Batch of (K, T, ...) arrays padded
    to the longest, and count (K,) int32 real rows (rows ≥ count are padding)."""

    rows: Batch
    count: jax.Array


def policy_data(transitions: Transitions, agent_ids: Sequence[int] | None = None) -> PolicyData:
    """BCQ-P (agent_ids None): all transitions as one policy's; BCQ-A: one
    policy per id, holding that agent's transitions only."""
    agent_of = np.asarray(transitions.agent_id)
    if agent_ids is None:
        groups = [np.arange(agent_of.shape[0])]
    else:
        groups = [np.flatnonzero(agent_of == a) for a in agent_ids]
    length = max(len(g) for g in groups)
    action_dtype = np.int32 if transitions.discrete else np.float32
    not_done = 1.0 - np.asarray(transitions.done, np.float32)

    def stack(values, dtype):
        values = np.asarray(values, dtype)
        out = np.zeros((len(groups), length, *values.shape[1:]), dtype)
        for k, rows in enumerate(groups):
            out[k, :len(rows)] = values[rows]
        return jnp.asarray(out)

    rows = Batch(stack(transitions.obs, np.float32), stack(transitions.action, action_dtype),
                 stack(transitions.next_obs, np.float32), stack(transitions.reward, np.float32),
                 stack(not_done, np.float32))
    return PolicyData(rows, jnp.asarray([len(g) for g in groups], jnp.int32))


def _sample(data: PolicyData, key, batch_size: int) -> Batch:
    """A minibatch drawn uniformly with replacement from one policy's rows."""
    index = jax.random.randint(key, (batch_size,), 0, data.count)
    return jax.tree.map(lambda rows: rows[index], data.rows)


@functools.lru_cache(maxsize=32)
def make_chunk_fn(config: BCQConfig, discrete: bool, length: int):
    """The jitted chunk: (states, data: PolicyData, keys (K, 2), start) ->
    (states, mean metrics (K,)); `length` iterations start..start+length-1 of
    every policy, vmapped over the K policies (config resolved)."""
    update = discrete_update if discrete else continuous_update

    def one_policy(state, data, key, start):
        def step(state, iteration):
            batch_key, update_key = jax.random.split(jax.random.fold_in(key, iteration))
            return update(state, _sample(data, batch_key, config.batch_size), update_key, config)

        state, metrics = jax.lax.scan(step, state, start + jnp.arange(length))
        return state, jax.tree.map(jnp.mean, metrics)

    return jax.jit(jax.vmap(one_policy, in_axes=(0, 0, 0, None)))


def _program_config(config: BCQConfig) -> BCQConfig:
    """What the compiled programs depend on: all but the number of iterations
    (one program serves runs of any length, and a resumed run)."""
    return dataclasses.replace(config, iterations=1)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _init_states(keys, config: BCQConfig, discrete: bool, obs_dim: int, action_size: int):
    """K fresh training states, one per key (K, 2); action_size: the number
    of discrete actions or the continuous action dimension."""
    init = init_discrete if discrete else init_continuous
    return jax.vmap(lambda key: init(key, obs_dim, action_size, config))(keys)


def _check_inputs(transitions: Transitions, config: BCQConfig, agent_ids) -> None:
    validate_transitions(transitions)
    if not transitions.discrete:
        largest = float(np.max(np.abs(np.asarray(transitions.action))))
        if largest > config.max_action * (1 + 1e-6):
            raise ValueError(f"action: continuous actions must lie in [-{config.max_action}, "
                             f"{config.max_action}] (max_action); found |a| = {largest:.4g}")
    if agent_ids is None:
        return
    ids = [int(a) for a in agent_ids]
    if not ids or len(set(ids)) != len(ids):
        raise ValueError(f"agent_ids: a non-empty list of distinct agent ids; got {ids}")
    counts = transitions.transitions_per_agent()
    bad = [a for a in ids if not 0 <= a < transitions.num_agents or counts[a] == 0]
    if bad:
        raise ValueError(f"agent_ids: agents {bad} have no transitions (ids 0.."
                         f"{transitions.num_agents - 1})")


def fit(transitions: Transitions, config: BCQConfig | None = None, *, key: jax.Array,
        agent_ids: Sequence[int] | None = None, checkpoint_dir: str | os.PathLike | None = None,
        chunk_iterations: int = CHUNK_ITERATIONS, progress: bool = True) -> BCQPolicies:
    """Trains BCQ-P (agent_ids None: one policy on every transition) or BCQ-A
    (one policy per id of `agent_ids`, each on its agent's transitions only).

    Discrete or continuous follows `transitions.discrete`. Policy k's
    randomness is fold_in(key, agent) (BCQ-P: agent 0): its init key and the
    key of each iteration.

    Args:
      transitions: the logged data (`done` = true terminations).
      config: `BCQConfig` (default: the paper's).
      key: PRNG key.
      agent_ids: BCQ-A's agents (dataset ids 0..N-1).
      checkpoint_dir: resumable orbax checkpoints after every chunk; a
        directory holding a different run is refused.
      chunk_iterations: iterations per jitted call (progress, checkpoints).
      progress: show a tqdm bar.

    Returns:
      `BCQPolicies`, params stacked over K = len(agent_ids) (BCQ-P: 1).
    """
    config = (config or BCQConfig()).resolved(transitions.discrete)
    _check_inputs(transitions, config, agent_ids)
    positive_int("chunk_iterations", chunk_iterations)
    data = policy_data(transitions, agent_ids)
    agents = jnp.asarray([0] if agent_ids is None else [int(a) for a in agent_ids])
    keys = jax.vmap(lambda a: jax.random.split(jax.random.fold_in(key, a)))(agents)
    # The initial states depend on the layer sizes only.
    sizes = BCQConfig(q_hidden=config.q_hidden, vae_hidden=config.vae_hidden,
                      actor_hidden=config.actor_hidden, critic_hidden=config.critic_hidden)
    state = _init_states(keys[:, 0], sizes, transitions.discrete, transitions.obs_dim,
                         transitions.num_actions or transitions.action_dim)
    run = (_run_description(data, config, key, transitions.discrete, agent_ids)
           if checkpoint_dir is not None else None)
    state = _train_chunks(state, data, keys[:, 1], config, transitions.discrete,
                          int(chunk_iterations), checkpoint_dir, run, progress)
    if transitions.discrete:
        params = state.params
    else:
        params = {"vae": state.vae, "actor": state.actor, "critic": state.critic}
    return BCQPolicies(params, config,
                       None if agent_ids is None else tuple(int(a) for a in agent_ids))


def _train_chunks(state, data: PolicyData, keys, config: BCQConfig, discrete: bool,
                  chunk: int, checkpoint_dir, run: dict | None, progress: bool):
    """The chunks on `training.run_loop`: resumes from the latest checkpoint,
    saves after every chunk, shows progress."""
    def step(state, start: int, length: int):
        program = make_chunk_fn(_program_config(config), discrete, length)
        return program(state, data, keys, start)

    state, _ = training.run_loop(
        state, step, num_steps=config.iterations, chunk=chunk, checkpoint_dir=checkpoint_dir,
        run_description=run, unit="iteration", desc=f"bcq ({data.count.shape[0]} policies)",
        progress=progress,
        postfix=lambda metrics: {name: f"{float(np.mean(value)):.4g}"
                                 for name, value in metrics.items()})
    return state


# ---------------------------------------------------------------------------
# Checkpoints


def _run_description(data: PolicyData, config: BCQConfig, key, discrete: bool,
                     agent_ids) -> dict:
    """What must match for a checkpoint to be resumed (JSON-able): the data's
    digest, the config (`iterations` aside: a run may be extended), the key."""
    description = {"format": CHECKPOINT_FORMAT, "discrete": bool(discrete),
                   **{k: v for k, v in config.to_dict().items() if k != "iterations"},
                   "agent_ids": None if agent_ids is None else [int(a) for a in agent_ids],
                   "key": checkpoints.key_list(key),
                   "data_sha256": checkpoints.data_digest(jax.tree.leaves(data))}
    return json.loads(json.dumps(description))
