"""Where and in what pieces the objective rolls candidates out: the shared
prefix tree of discrete candidates, chunks on a CPU, shards over devices.
Speed and memory only: the returns are those of one batch on one device.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from persim_jax.types import Dynamics

Array = jax.Array

# On a CPU, roll out at most this many candidates at once (`rollout_chunk="auto"`):
# with M = 5 members and 256-wide layers one chunk's activations (~1.3 MB) stay
# in the core's cache for the whole step. With one device per core
# (`persim_jax.use_cpu_cores`, 2 cores) each device's 500 of random shooting's
# 1000 candidates run as 2 chunks of 250: the rollouts of the paper's 4-state,
# 2-action model (benchmarks/mpc_throughput.py) take 3.5 ms, against
# 4.7 ms for 500 at once and 3.6 ms for 4 chunks of 125. CEM's 200 samples stay
# one batch (smaller matmuls would be slower there).
CPU_ROLLOUT_CHUNK = 256

# Mesh axis of `shard_candidates`.
CANDIDATE_AXIS = "candidates"


def rollout(dynamics: Dynamics, feed, accumulate, state: Array, accumulated, weight: Array,
            actions: Array):
    """The accumulator (M, b) after the remaining steps `actions` (H', b[, A])
    of the b candidates in `state` (M, b, D), from `accumulated` (M, b) and
    the weight () of the first of them.

    `feed(next_state (M, b, D)) -> (M, b, D)` is the propagation,
    `accumulate((accumulator, weight), (state, action, next_state))` adds
    one step (`objective.propagate`, `objective.accumulate_step`)."""

    def step(carry, action):
        state, accumulated = carry
        next_state = dynamics(state, action)
        return (feed(next_state), accumulate(accumulated, (state, action, next_state))), None

    (_, (accumulated, _)), _ = jax.lax.scan(step, (state, (accumulated, weight)), actions)
    return accumulated


def prefix_transitions(dynamics: Dynamics, feed, obs: Array, steps: Array,
                       num_actions: int | None, depth: int):
    """The transitions of the candidates' first steps, computed once per
    distinct action prefix.

    Args:
      dynamics: a `persim_jax.types.Dynamics`.
      feed: the propagation (`objective.propagate` with its mode).
      obs: (D,) ŝ_0.
      steps: (H, B) int or (H, B, A) float, the candidates' actions by step.
      num_actions: the number of discrete actions, or None.
      depth: `objective.shared_prefix_depth` L.

    Returns:
      ((states (L', M, B, D), actions (L', B[, A]), next_states (L', M, B, D)),
      L'), with L' = L, or 1 (every candidate's first step) when L is 0.
    """
    num_sequences, dim = steps.shape[1], obs.shape[-1]
    if not depth:
        predicted = dynamics(jnp.broadcast_to(obs, (num_sequences, dim)), steps[0])
        first_state = jnp.broadcast_to(obs, predicted.shape)
        return (first_state[None], steps[:1], predicted[None]), 1
    # Level t holds the states after each of the num_actions^t prefixes;
    # child i · nA + j of node i took action j. A Python loop: the levels
    # differ in size (depth <= log_nA(B), about 10).
    children = jnp.arange(num_actions, dtype=steps.dtype)
    predicted = dynamics(jnp.broadcast_to(obs, (num_actions, dim)), children)
    levels, inputs = [predicted], [jnp.broadcast_to(obs, (predicted.shape[0], 1, dim))]
    for _ in range(1, depth):
        fed = feed(levels[-1])
        inputs.append(fed)
        levels.append(dynamics(jnp.repeat(fed, num_actions, axis=1),
                               jnp.tile(children, fed.shape[1])))
    # Each candidate's node at every level: its prefix read in base nA.
    node = jnp.zeros((num_sequences,), jnp.int32)
    fed_states, next_states = [], []
    for t in range(depth):
        fed_states.append(jnp.take(inputs[t], node, axis=1))
        node = node * num_actions + steps[t].astype(jnp.int32)
        next_states.append(jnp.take(levels[t], node, axis=1))
    return (jnp.stack(fed_states), steps[:depth], jnp.stack(next_states)), depth


def rollout_candidates(rollout_fn, rest, weight: Array, *, rollout_chunk: int | str | None,
                       shard_candidates: bool):
    """(finite, total, best) (M, B) after the remaining steps of all B candidates.

    Args:
      rollout_fn: `rollout_fn(state (M, b, D), accumulator (M, b), weight,
        actions (H', b[, A])) -> accumulator (M, b)` for any b candidates.
      rest: (state (M, B, D), `ReturnAccumulator` (M, B), actions (H', B[, A])),
        the candidates on axis 1.
      weight: () γ^t of the first remaining step.
      rollout_chunk, shard_candidates: as in `objective.member_returns`.
    """
    if rollout_chunk == "auto":
        rollout_chunk = CPU_ROLLOUT_CHUNK if jax.default_backend() == "cpu" else None
    in_chunks = functools.partial(rollout_in_chunks, rollout_fn, rollout_chunk=rollout_chunk)
    devices = candidate_devices(shard_candidates)
    if devices is None:
        return in_chunks(rest, weight)
    # One shard of the candidates per device, no communication until the
    # scores come back (on a CPU with one device per core, each core
    # rolls out its own candidates: see `persim_jax.use_cpu_cores`).
    num_members, num_sequences = rest[0].shape[:2]
    num_devices = len(devices)
    size = math.ceil(num_sequences / num_devices)
    shards = jax.tree.map(lambda x: split_candidates(x, num_devices, size), rest)
    mesh = Mesh(np.asarray(devices), (CANDIDATE_AXIS,))
    spec = PartitionSpec(CANDIDATE_AXIS)
    sharded = jax.shard_map(lambda r, w: tuple(x[None] for x in in_chunks(
                                jax.tree.map(lambda x: x[0], r), w)),
                            mesh=mesh, in_specs=(spec, PartitionSpec()),
                            out_specs=(spec,) * 3, check_vma=False)
    return tuple(jnp.moveaxis(x, 0, 1).reshape(num_members, -1)[:, :num_sequences]
                 for x in sharded(shards, weight))


def rollout_in_chunks(rollout_fn, rest, weight: Array, *, rollout_chunk: int | None):
    """(finite, total, best) (M, b) of the b candidates in `rest` (see
    `rollout_candidates`), `rollout_chunk` at a time (None: all at once)."""
    num_members, count = rest[0].shape[:2]
    num_chunks = 1 if not rollout_chunk else math.ceil(count / rollout_chunk)
    if num_chunks <= 1:
        accumulated = rollout_fn(rest[0], rest[1], weight, rest[2])
        return accumulated.finite, accumulated.total, accumulated.best
    # Candidates in chunks, one after the other (lax.map): on a CPU one
    # chunk's activations then stay in cache for the whole step.
    size = math.ceil(count / num_chunks)
    chunks = jax.tree.map(lambda x: split_candidates(x, num_chunks, size), rest)
    chunked = jax.lax.map(lambda r: rollout_fn(r[0], r[1], weight, r[2]), chunks)
    return tuple(jnp.moveaxis(x, 0, 1).reshape(num_members, -1)[:, :count]
                 for x in (chunked.finite, chunked.total, chunked.best))


def split_candidates(x: Array, parts: int, size: int) -> Array:
    """(A, B, ...) -> (parts, A, size, ...), B padded to parts · size with
    copies of the first candidates (their scores are dropped)."""
    pad = parts * size - x.shape[1]
    if pad:
        x = jnp.concatenate([x, jnp.broadcast_to(x[:, :1], (x.shape[0], pad, *x.shape[2:]))],
                            axis=1)
    return jnp.moveaxis(x.reshape(x.shape[0], parts, size, *x.shape[2:]), 1, 0)


def candidate_devices(shard_candidates: bool):
    """The devices to split candidates over, or None: only with more than one
    local device, and not inside a region that is already sharded by hand
    (`evaluation.run_episodes` gives every device whole episodes)."""
    if not shard_candidates or jax.local_device_count() < 2:
        return None
    if jax.sharding.get_abstract_mesh().manual_axes:
        return None
    return tuple(jax.local_devices())
