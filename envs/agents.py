"""Descriptions of the heterogeneous agent populations of the paper (Table 1).

An agent is a vector of covariates ``(P,)``: the physical parameters that make
it differ from the others (gravity, pole length, mass scale, ...). The model
never sees them; they generate the data and colour the plots.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class AgentSpec:
    """The covariates of one environment's agents.

    Attributes:
      names: covariate names, in the order of the paper's tables.
      low: (P,) lower ends of the paper's ranges (Table 1).
      high: (P,) upper ends of the paper's ranges.
      test_agents: (5, P) the paper's test agents; dataset units 0..4.
      policy_training_agents: (K, P) agents the "pure" logging policies are
        trained on (Table 1, last column).
      default: (P,) the environment's default agent.
    """

    names: tuple[str, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    test_agents: tuple[tuple[float, ...], ...]
    policy_training_agents: tuple[tuple[float, ...], ...]
    default: tuple[float, ...]

    def __post_init__(self):
        p = len(self.names)
        rows = (self.low, self.high, self.default, *self.test_agents,
                *self.policy_training_agents)
        if any(len(row) != p for row in rows):
            raise ValueError(f"every covariate row needs {p} entries: {self.names}")
        for row in rows[2:]:
            self.validate(np.asarray(row))

    @property
    def num_covariates(self) -> int:
        return len(self.names)

    def describe(self) -> str:
        """'gravity in [0.0001, 0.0035]'-style text, one clause per covariate."""
        return ", ".join(f"{n} in [{lo:g}, {hi:g}]"
                         for n, lo, hi in zip(self.names, self.low, self.high))

    def validate(self, covariates, *, allow_extrapolation: bool = False) -> np.ndarray:
        """Checks covariates at the edge of the library.

        Args:
          covariates: (P,) one agent or (N, P) a batch.
          allow_extrapolation: accept values outside the paper's ranges (they
            must still be finite and positive, i.e. physically meaningful).

        Returns:
          The covariates as a float64 numpy array of the same shape.

        Raises:
          ValueError: wrong shape, NaN/inf, or a value out of range, naming the
            covariate, its range and the offending agent.
        """
        values = np.asarray(covariates, dtype=np.float64)
        p = self.num_covariates
        if values.ndim not in (1, 2) or values.shape[-1] != p:
            raise ValueError(
                f"covariates must have shape ({p},) or (N, {p}) for {self.names}; "
                f"got shape {values.shape}")
        batch = values.reshape(-1, p)
        for j, name in enumerate(self.names):
            column = batch[:, j]
            bad = ~np.isfinite(column)
            if bad.any():
                row = int(np.argmax(bad))
                raise ValueError(
                    f"covariate '{name}' of agent {row} is {column[row]}; "
                    f"it must be a finite number in [{self.low[j]:g}, {self.high[j]:g}]")
            if allow_extrapolation:
                bad = column <= 0
                reason = "must be positive"
            else:
                # A relative tolerance keeps values such as 0.0001 read back
                # from float32 inside the range.
                tol = 1e-6 * (self.high[j] - self.low[j])
                bad = (column < self.low[j] - tol) | (column > self.high[j] + tol)
                reason = (f"is outside the paper's range [{self.low[j]:g}, "
                          f"{self.high[j]:g}] (pass allow_extrapolation=True to use it)")
            if bad.any():
                row = int(np.argmax(bad))
                raise ValueError(f"covariate '{name}' of agent {row} = {column[row]:g} {reason}")
        return values

    def sample(self, key: jax.Array, num_agents: int) -> jax.Array:
        """Returns (num_agents, P) covariates: rows 0..4 are the test agents,
        the rest i.i.d. uniform in the paper's ranges (independently per
        covariate), as the paper's populations of 500 agents."""
        if num_agents < 1:
            raise ValueError(f"num_agents must be >= 1, got {num_agents}")
        test = jnp.asarray(self.test_agents)[:num_agents]
        rest = jax.random.uniform(
            key, (max(num_agents - len(self.test_agents), 0), self.num_covariates),
            minval=jnp.asarray(self.low), maxval=jnp.asarray(self.high))
        return jnp.concatenate([test, rest], axis=0)

    def normalise(self, covariates) -> jax.Array:
        """Maps covariates (..., P) to [0, 1]^P within the paper's ranges."""
        low = jnp.asarray(self.low)
        return (jnp.asarray(covariates) - low) / (jnp.asarray(self.high) - low)

    def nearest(self, covariates, candidates: Sequence[Sequence[float]] | None = None) -> jax.Array:
        """Index of the nearest candidate (default: the policy-training agents)
        in range-normalised covariates; (...,) int for covariates (..., P)."""
        cands = self.policy_training_agents if candidates is None else candidates
        diff = self.normalise(covariates)[..., None, :] - self.normalise(jnp.asarray(cands))
        return jnp.argmin(jnp.sum(diff ** 2, axis=-1), axis=-1)
