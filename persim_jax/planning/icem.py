"""Improved CEM (Pinneri et al., CoRL 2020) for continuous actions in a box:
coloured-noise samples, a shrinking population, elites carried over between
rounds and plans."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from persim_jax.planning.base import Planner
from persim_jax.planning.objective import ObjectiveConfig, check_positive, score_sequences
from persim_jax.types import RewardFn, TerminatedFn

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ICEMConfig(ObjectiveConfig):
    """Improved CEM (Pinneri et al., CoRL 2020) for continuous actions in a box.

    Round i (0 .. num_rounds) samples max(num_samples · decay^-i, 2 ·
    num_elites) sequences of temporally correlated ("coloured") noise, power
    spectrum ∝ 1 / f^β along the horizon, around the mean μ with std σ,
    clipped to the box. A fraction `keep_elites` of the elites is carried to
    the next round (and, shifted by one step, to the next plan's first round);
    the last round also scores μ itself. μ and σ move towards the elites'
    mean and std with `momentum`; the plan plays the first action of the best
    sequence seen in any round (`execute="best"`, Pinneri et al.) or of the
    final μ (`execute="mean"`, as CEM plays its elite mean).

    Attributes:
      action_dim: A.
      num_samples: sequences of round 0.
      horizon: steps per sequence.
      num_elites: best sequences per round.
      num_rounds: rounds after the first.
      decay: the population shrinks by this factor every round (γ ≥ 1).
      beta: colour of the noise (0 white, 2 "red"/Brownian-like).
      keep_elites: fraction of the elites carried over (ξ).
      momentum: μ ← momentum · μ + (1 − momentum) · elite mean, σ likewise.
      init_std: σ at the start of every plan.
      execute: "best" (the best sequence scored) or "mean" (the final μ).
      action_low, action_high: the action box.
      min_std: floor of σ when sampling.
      discount, aggregation, propagation, position_bonus, position_index,
        rollout_chunk, shard_candidates: the objective (`ObjectiveConfig`).
    """

    action_dim: int
    num_samples: int = 100
    horizon: int = 30
    num_elites: int = 10
    num_rounds: int = 3
    decay: float = 1.25
    beta: float = 2.5
    keep_elites: float = 0.3
    momentum: float = 0.1
    init_std: float = 0.5
    execute: str = "best"
    action_low: float = -1.0
    action_high: float = 1.0
    min_std: float = 1e-6

    def __post_init__(self):
        check_positive(self, "action_dim", "num_samples", "num_elites")
        super().__post_init__()
        if not 2 <= self.num_elites <= self.num_samples:
            raise ValueError(f"num_elites: must be in [2, num_samples={self.num_samples}]; got "
                             f"{self.num_elites!r}")
        if not isinstance(self.num_rounds, (int, np.integer)) or self.num_rounds < 0:
            raise ValueError(f"num_rounds: must be an integer >= 0; got {self.num_rounds!r}")
        if not (math.isfinite(self.decay) and self.decay >= 1.0):
            raise ValueError(f"decay: must be a number >= 1; got {self.decay!r}")
        if not (math.isfinite(self.beta) and self.beta >= 0.0):
            raise ValueError(f"beta: must be a number >= 0; got {self.beta!r}")
        if not 0.0 <= self.keep_elites <= 1.0:
            raise ValueError(f"keep_elites: must be in [0, 1]; got {self.keep_elites!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum: must be in [0, 1); got {self.momentum!r}")
        if not self.init_std > 0.0:
            raise ValueError(f"init_std: must be > 0; got {self.init_std!r}")
        if self.execute not in ("best", "mean"):
            raise ValueError(f"execute: must be 'best' or 'mean'; got {self.execute!r}")
        if not self.action_low < self.action_high:
            raise ValueError(f"action_low, action_high: need low < high; got "
                             f"{self.action_low!r}, {self.action_high!r}")

    def population(self) -> tuple[int, ...]:
        """Sequences sampled in each round (before the carried elites)."""
        return tuple(max(int(self.num_samples * self.decay ** -i), 2 * self.num_elites)
                     for i in range(self.num_rounds + 1))

    @property
    def num_kept(self) -> int:
        return int(round(self.keep_elites * self.num_elites))

    def sequences_per_plan(self) -> int:
        """Sequences scored per plan: sampled, carried elites and the final mean."""
        return sum(self.population()) + self.num_kept * (self.num_rounds + 1) + 1


def colored_noise(key: Array, beta: float, shape: tuple[int, ...]) -> Array:
    """Gaussian noise of unit variance along the last axis (time) with power
    spectrum ∝ 1 / f^β (β = 0: white), independent over the leading axes."""
    steps = shape[-1]
    freqs = jnp.fft.rfftfreq(steps)
    freqs = freqs.at[0].set(1.0 / steps)           # the lowest frequency's weight for f = 0
    scale = freqs ** (-beta / 2.0)
    real_key, imag_key = jax.random.split(key)
    spectrum_shape = (*shape[:-1], freqs.shape[0])
    real = jax.random.normal(real_key, spectrum_shape) * scale
    imag = jax.random.normal(imag_key, spectrum_shape) * scale
    # The f = 0 (and, for an even length, the Nyquist) coefficient is real.
    imag = imag.at[..., 0].set(0.0)
    if steps % 2 == 0:
        imag = imag.at[..., -1].set(0.0)
    noise = jnp.fft.irfft(real + 1j * imag, n=steps, axis=-1)
    # x_t = (X_0 + 2 Σ_k Re(X_k e^{iωkt}) [+ X_{N/2} (−1)^t]) / N: each paired
    # coefficient adds 4 scale² to N² var(x_t), the real-only ones scale².
    weights = jnp.full(freqs.shape, 4.0).at[0].set(1.0)
    if steps % 2 == 0:
        weights = weights.at[-1].set(1.0)
    variance = jnp.sum(weights * scale ** 2) / steps ** 2
    return (noise / jnp.sqrt(variance)).astype(jnp.float32)


class ICEMState(NamedTuple):
    """Warm start of iCEM: the mean (H, A) and the carried elites (k, H, A),
    both shifted by one step; `has_elites` False at the start of an episode."""

    mean: Array
    elites: Array
    has_elites: Array


def icem(config: ICEMConfig, reward_fn: RewardFn,
         terminated_fn: TerminatedFn | None = None) -> Planner:
    """Improved-CEM MPC for continuous actions in a box (`ICEMConfig`).

    One compiled program per plan: the rounds are unrolled (their
    populations differ in size), each round's sequences scored as CEM's
    (`score_sequences`: the min over members by default). Plays the first
    action of the best sequence seen in any round, or of the final mean
    (`config.execute`).
    """
    if not isinstance(config, ICEMConfig):
        raise ValueError(f"config: expected an ICEMConfig, got {type(config).__name__}")
    shape = (config.horizon, config.action_dim)
    low, high = config.action_low, config.action_high
    kept = config.num_kept

    def init() -> ICEMState:
        return ICEMState(jnp.zeros(shape, jnp.float32), jnp.zeros((kept, *shape), jnp.float32),
                         jnp.array(False))

    def sample(key, mean, std, count):
        noise = colored_noise(key, config.beta, (count, config.action_dim, config.horizon))
        return jnp.clip(mean + std * jnp.swapaxes(noise, 1, 2), low, high)

    def plan_sequence(key, state: ICEMState, obs, dynamics):
        """(the best sequence seen (H, A); state)."""
        keys = jax.random.split(key, config.num_rounds + 2)
        mean, std = state.mean, jnp.full(shape, config.init_std, jnp.float32)
        # Round 0 carries the previous plan's elites, shifted; fresh samples
        # stand in for them at the start of an episode.
        carried = jnp.where(state.has_elites, state.elites,
                            sample(keys[-1], mean, std, kept))
        best, best_score = jnp.zeros(shape, jnp.float32), jnp.array(-jnp.inf)
        populations = config.population()
        for i, count in enumerate(populations):
            candidates = sample(keys[i], mean, jnp.maximum(std, config.min_std), count)
            parts = [candidates] + ([carried] if kept else [])
            if i == len(populations) - 1:
                parts.append(jnp.clip(mean, low, high)[None])
            candidates = jnp.concatenate(parts)
            scores = score_sequences(dynamics, reward_fn, terminated_fn, obs, candidates, config)
            top, index = jax.lax.top_k(scores, config.num_elites)
            elite = candidates[index]
            better = top[0] > best_score
            best = jnp.where(better, elite[0], best)
            best_score = jnp.where(better, top[0], best_score)
            carried = elite[:kept]
            mean = config.momentum * mean + (1 - config.momentum) * jnp.mean(elite, 0)
            std = config.momentum * std + (1 - config.momentum) * jnp.std(elite, 0, ddof=1)

        def shift(x):
            return jnp.concatenate([x[..., 1:, :], jnp.zeros_like(x[..., :1, :])], axis=-2)

        played = best if config.execute == "best" else mean
        played = jnp.clip(jnp.nan_to_num(played), low, high)
        return played, ICEMState(shift(mean), shift(carried), jnp.array(True))

    def plan(key, state: ICEMState, obs, dynamics):
        sequence, state = plan_sequence(key, state, obs, dynamics)
        return sequence[0], state

    return Planner(init, plan, config, plan_sequence)
