"""PerSim's ensemble of personalised simulators: `Simulator` and its file format.

`Simulator` bundles an ensemble of M networks of `persim_jax.persim.model`
(parameters stacked on a leading axis), the standardisation statistics and
the static config: `predict`, `predict_members`, `rollout`, `agent_factors`,
`add_agents` (`persim_jax.persim.newcomers`), `save` / `load`.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, struct

from persim_jax.data import atomic_write, decode_msgpack
from persim_jax.data.checks import plain
from persim_jax.persim import newcomers
from persim_jax.persim.model import (
    ModelConfig,
    NormStats,
    Params,
    agent_factors,
    init_params,
    predict_next_obs,
)



SIMULATOR_FORMAT = "persim-jax-simulator"
SIMULATOR_VERSION = 1


@struct.dataclass
class Simulator:
    """An ensemble of M personalised simulators of N agents.

    A pytree: every method is a pure function of it, jittable and vmappable
    over agents and batches (`jax.jit(Simulator.predict)(sim, ...)`).

    Attributes:
      params: network parameters with a leading ensemble axis M on every leaf.
      stats: standardisation statistics (shared by the members).
      validation_loss: (M,) best validation MSE (standardised Δ) of each member,
        NaN when trained without validation.
      config: the network's static configuration.
      rank_losses: with `rank="auto"`, ((rank, mean validation loss), ...) of
        every candidate rank; else None.
      agent_keys: original ids of agents 0..N-1 when the data's ids were
        mapped (see `data.Transitions.agent_keys`); else None.
    """

    params: Params
    stats: NormStats
    validation_loss: jax.Array
    config: ModelConfig = struct.field(pytree_node=False)
    rank_losses: tuple | None = struct.field(pytree_node=False, default=None)
    agent_keys: tuple | None = struct.field(pytree_node=False, default=None)

    @property
    def ensemble_size(self) -> int:
        return int(jax.tree.leaves(self.params)[0].shape[0])

    @property
    def num_agents(self) -> int:
        return self.config.num_agents

    @property
    def obs_dim(self) -> int:
        return self.config.obs_dim

    @property
    def rank(self) -> int:
        return self.config.rank

    def agent_indices(self, agent_id):
        """Agent indices 0..N-1 of `agent_id`: the data's own agent ids (keys,
        e.g. "adult#001"; `agent_keys`) are looked up, integers are indices.

        Args:
          agent_id: an index or a key, or a list / array (...) of either.
            Integer JAX arrays (traced or not) pass through untouched, so
            jitted callers pay nothing; Python and numpy integers are
            checked to lie in 0..N-1 (an integer id that is not its own index
            is looked up with `agent_index(id)`).

        Returns:
          () or (...) int indices (the input itself for JAX arrays).

        Raises:
          ValueError naming an unknown key or an index outside 0..N-1.
        """
        if isinstance(agent_id, jax.Array):
            return agent_id
        if isinstance(agent_id, str):
            return self.agent_index(agent_id)
        array = np.asarray(agent_id)
        if array.dtype.kind in "iu":
            bad = np.flatnonzero((array < 0) | (array >= self.num_agents))
            if bad.size:
                value = int(array.ravel()[bad[0]])
                keyed = (f"; an agent id from the data is looked up with agent_index"
                         f"({value})" if self.agent_keys is not None else "")
                raise ValueError(f"agent_id: index {value} is outside 0..{self.num_agents - 1}"
                                 f"{keyed}")
            return array.astype(np.int32) if array.ndim else int(array)
        if array.dtype.kind in "USO":
            return np.asarray([self.agent_index(key) for key in array.ravel().tolist()],
                              np.int32).reshape(array.shape)
        raise ValueError(f"agent_id: expected agent indices (integers) or the data's agent ids; "
                         f"got {plain(agent_id)!r}")

    def predict(self, agent_id, obs, action) -> jax.Array:
        """Next states predicted by every member from the same input.

        Args:
          agent_id: () or (...) agent index in 0..N-1, or the data's agent id
            (`agent_keys`), or an array of either (`agent_indices`).
          obs: (D,) or (..., D) raw state.
          action: () / (...) int, or (A,) / (..., A) float raw action.

        Returns:
          (M, D) next states, or (M, ..., D) with broadcast batch dims.
        """
        return jax.vmap(predict_next_obs, in_axes=(0, None, None, None, None, None))(
            self.params, self.stats, self.config, self.agent_indices(agent_id), obs, action)

    def predict_members(self, agent_id, obs, action) -> jax.Array:
        """Member m predicts from its own state obs[m].

        Args:
          agent_id: () or (...) int, or the data's agent ids (`agent_indices`).
          obs: (M, D) or (M, ..., D) one state per member.
          action: () / (...) int or (A,) / (..., A) float, shared by members.

        Returns:
          (M, D) or (M, ..., D) next states.
        """
        return jax.vmap(predict_next_obs, in_axes=(0, None, None, None, 0, None))(
            self.params, self.stats, self.config, self.agent_indices(agent_id), obs, action)

    def rollout(self, agent_id, obs0, actions) -> jax.Array:
        """Open-loop rollout: every member propagates its own predicted state.

        Args:
          agent_id: () or (...) int, or the data's agent ids (`agent_indices`).
          obs0: (D,) or (..., D) initial raw state.
          actions: (H,) int / (H, A) float, or (H, ...) / (H, ..., A) batched.

        Returns:
          (M, H, D) or (M, H, ..., D): ŝ_1..ŝ_H, with ŝ_{t+1} = f_m(ŝ_t, a_t).
        """
        agent_id = self.agent_indices(agent_id)
        obs0 = jnp.asarray(obs0, jnp.float32)
        actions = jnp.asarray(actions)
        start = jnp.broadcast_to(obs0, (self.ensemble_size, *obs0.shape))

        def step(obs, action):
            next_obs = self.predict_members(agent_id, obs, action)
            return next_obs, next_obs

        _, trajectory = jax.lax.scan(step, start, actions)     # (H, M, ..., D)
        return jnp.moveaxis(trajectory, 0, 1)

    def agent_factors(self, member: int | None = 0, agents=None) -> jax.Array:
        """Latent agent factors u(n) = one-hot(n) W + b.

        Args:
          member: which ensemble member; None for all.
          agents: None for every agent, or K agent indices / the data's agent
            ids (`agent_indices`), e.g. ["adult#001", "adult#007"].

        Returns:
          (N, r) for one member, (M, N, r) for member=None; (K, r) / (M, K, r)
          with `agents`.
        """
        factors = jax.vmap(agent_factors, in_axes=(0, None))(self.params, self.config)
        if agents is not None:
            factors = jnp.take(factors, jnp.asarray(self.agent_indices(agents)), axis=1)
        return factors if member is None else factors[member]

    def add_agents(self, transitions, *, ridge=None) -> "Simulator":
        """The simulator with the K agents of `transitions` (ids 0..K-1 there)
        added as agents N..N+K-1, without retraining: each member's factor of
        each new agent in closed form (ridge least squares towards the training
        factors' distribution, `persim_jax.newcomers`). The old agents'
        predictions are unchanged bit for bit.

        Args:
          transitions: the new agents' `Transitions`, at least one each.
          ridge: None (each member's validation MSE), or a positive λ (or (M,)).

        Returns:
          A `Simulator` of N + K agents.
        """
        return newcomers.add_agents(self, transitions, ridge=ridge)

    def agent_index(self, key) -> int:
        """Index 0..N-1 of the agent whose original id is `key` (an id read as
        a number from a file also matches its text: 7 and "7")."""
        key = plain(key)
        if self.agent_keys is None:
            try:
                index = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"agent_id: {key!r}: this simulator's agents have no ids "
                                 f"besides their indices 0..{self.num_agents - 1}") from None
            if not 0 <= index < self.num_agents:
                raise ValueError(f"agent_id: {key!r} outside 0..{self.num_agents - 1}")
            return index
        keys = [plain(k) for k in self.agent_keys]
        if key in keys:
            return keys.index(key)
        as_text = [str(k) for k in keys]
        if str(key) in as_text:
            return as_text.index(str(key))
        shown = ", ".join(repr(k) for k in keys[:5]) + (", ..." if len(keys) > 5 else "")
        raise ValueError(f"agent_id: {key!r} is not one of the {self.num_agents} agent ids "
                         f"({shown})")

    def save(self, path: str | os.PathLike) -> None:
        """Writes the simulator to one file (msgpack), atomically."""
        with atomic_write(path) as handle:
            handle.write(self.to_bytes())

    def to_bytes(self) -> bytes:
        """The simulator as msgpack bytes (what `save` writes)."""
        payload = {
            "format": SIMULATOR_FORMAT,
            "version": SIMULATOR_VERSION,
            "config": json.dumps(self.config.to_dict()),
            "rank_losses": json.dumps(None if self.rank_losses is None
                                      else [list(x) for x in self.rank_losses]),
            "agent_keys": json.dumps(None if self.agent_keys is None else list(self.agent_keys)),
            "params": jax.tree.map(np.asarray, serialization.to_state_dict(self.params)),
            "stats": jax.tree.map(np.asarray, serialization.to_state_dict(self.stats)),
            "validation_loss": np.asarray(self.validation_loss),
        }
        return serialization.msgpack_serialize(payload)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Simulator":
        """Reads a simulator written by `save`."""
        with open(path, "rb") as handle:
            return cls.from_bytes(handle.read(), source=os.fspath(path))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "simulator") -> "Simulator":
        """The simulator of `to_bytes`; `source` names it in errors."""
        payload = decode_msgpack(data, SIMULATOR_FORMAT, "a persim-jax simulator file", source)
        if payload.get("version") != SIMULATOR_VERSION:
            raise ValueError(f"{source}: version {payload.get('version')}, expected "
                             f"{SIMULATOR_VERSION}")
        config = ModelConfig(**json.loads(payload["config"]))
        rank_losses = json.loads(payload["rank_losses"])
        agent_keys = json.loads(payload["agent_keys"])
        template = jax.eval_shape(lambda: init_params(jax.random.PRNGKey(0), config))
        params = serialization.from_state_dict(template, payload["params"])
        params = jax.tree.map(jnp.asarray, params)
        stats = NormStats(**{k: jnp.asarray(v) for k, v in payload["stats"].items()})
        return cls(params=params, stats=stats,
                   validation_loss=jnp.asarray(payload["validation_loss"]), config=config,
                   rank_losses=None if rank_losses is None else tuple(
                       (int(r), float(v)) for r, v in rank_losses),
                   agent_keys=None if agent_keys is None else tuple(agent_keys))
