"""A reward learned from the data, for users who log rewards but cannot write
the reward down: an MLP r(s, a, s') fitted on the logged transitions, and its
error on transitions it never saw.

    model, error = fit_reward_model(training, key, held_out=held_out_transitions)
    model(obs, action, next_obs)         # (...) rewards, a `persim_jax.types.RewardFn`

The inputs are the standardised state, the action (one-hot when discrete,
standardised when continuous) and the standardised state change s' − s; the
target is the standardised reward. One model for every agent: a reward that
differs between agents is the simulator's business only through s'.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from persim_jax import networks
from persim_jax.data import Transitions


@struct.dataclass
class RewardModel:
    """r(s, a, s') as an MLP on standardised inputs; broadcasts over leading axes.

    Attributes:
      layers: the MLP's layers (`persim_jax.networks.mlp`).
      mean, std: (F,) standardisation of the F input features.
      reward_mean, reward_std: () of the target.
      num_actions: static; the number of discrete actions, None for continuous.
    """

    layers: list
    mean: jax.Array
    std: jax.Array
    reward_mean: jax.Array
    reward_std: jax.Array
    num_actions: int | None = struct.field(pytree_node=False, default=None)

    def __call__(self, obs, action, next_obs) -> jax.Array:
        """Rewards (...) of obs (..., D), action (...) int or (..., A), next_obs (..., D)."""
        x = (features(obs, action, next_obs, self.num_actions) - self.mean) / self.std
        return networks.mlp(self.layers, x)[..., 0] * self.reward_std + self.reward_mean


def features(obs, action, next_obs, num_actions: int | None) -> jax.Array:
    """(..., F) the model's inputs: state, action (one-hot if discrete), change."""
    obs = jnp.asarray(obs, jnp.float32)
    if num_actions is not None:
        action = jax.nn.one_hot(jnp.asarray(action, jnp.int32), num_actions)
    action = jnp.broadcast_to(jnp.asarray(action, jnp.float32),
                              (*obs.shape[:-1], jnp.shape(action)[-1]))
    return jnp.concatenate([obs, action, jnp.asarray(next_obs, jnp.float32) - obs], axis=-1)


def fit_reward_model(transitions: Transitions, key: jax.Array, *,
                     held_out: Transitions | None = None, hidden: tuple[int, ...] = (128, 128),
                     epochs: int = 100, batch_size: int = 256, learning_rate: float = 1e-3
                     ) -> tuple[RewardModel, dict | None]:
    """Fits r(s, a, s') by mean squared error (Adam, minibatches).

    Args:
      transitions: the training transitions (their `reward`).
      key: PRNG key (initialisation and minibatch order).
      held_out: transitions to report the error on (e.g. each agent's last
        20 %, `data.time_ordered_split`); None reports nothing.
      hidden, epochs, batch_size, learning_rate: the MLP and its training.

    Returns:
      (model, error): error is {"rmse", "r2", "constant_rmse" (predicting the
      training mean), "transitions"} on `held_out`, or None.
    """
    num_actions = transitions.num_actions
    x = np.asarray(features(transitions.obs, transitions.action, transitions.next_obs,
                            num_actions))
    y = np.asarray(transitions.reward, np.float32)
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("transitions: the reward model needs finite states, actions and rewards")
    mean, std = x.mean(0), x.std(0)
    if num_actions is not None:            # one-hot columns stay as they are
        a = slice(transitions.obs_dim, transitions.obs_dim + num_actions)
        mean[a], std[a] = 0.0, 1.0
    std = np.where(std > 1e-6, std, 1.0)
    reward_mean, reward_std = float(y.mean()), float(y.std()) or 1.0
    init_key, order_key = jax.random.split(key)
    layers = networks.init_mlp(init_key, (x.shape[1], *hidden, 1), networks.torch_uniform)
    x_std = jnp.asarray((x - mean) / std)
    y_std = jnp.asarray((y - reward_mean) / reward_std)
    layers = _train(layers, x_std, y_std, order_key, epochs=epochs,
                    batch_size=min(batch_size, len(y)), learning_rate=learning_rate)
    model = RewardModel(layers, jnp.asarray(mean), jnp.asarray(std), jnp.asarray(reward_mean),
                        jnp.asarray(reward_std), num_actions)
    return model, None if held_out is None else reward_error(model, held_out, reward_mean)


def _train(layers, x, y, key, *, epochs: int, batch_size: int, learning_rate: float):
    """Adam on minibatches, every epoch one permutation; one compiled program."""
    optimizer = optax.adam(learning_rate)
    batches = len(y) // batch_size

    def loss(layers, xb, yb):
        return jnp.mean((networks.mlp(layers, xb)[:, 0] - yb) ** 2)

    def epoch(carry, key):
        layers, opt_state = carry
        order = jax.random.permutation(key, len(y))[:batches * batch_size]

        def step(carry, index):
            layers, opt_state = carry
            grads = jax.grad(loss)(layers, x[index], y[index])
            updates, opt_state = optimizer.update(grads, opt_state, layers)
            return (optax.apply_updates(layers, updates), opt_state), None

        carry, _ = jax.lax.scan(step, (layers, opt_state), order.reshape(batches, batch_size))
        return carry, None

    run = jax.jit(lambda layers, keys: jax.lax.scan(
        epoch, (layers, optimizer.init(layers)), keys)[0][0])
    return run(layers, jax.random.split(key, epochs))


def reward_error(model: RewardModel, transitions: Transitions, constant: float) -> dict:
    """{"rmse", "r2", "constant_rmse", "transitions"} of `model` on `transitions`;
    constant_rmse: predicting `constant` (the training mean) instead."""
    y = np.asarray(transitions.reward, np.float64)
    predicted = np.asarray(model(transitions.obs, transitions.action, transitions.next_obs),
                           np.float64)
    rmse = float(np.sqrt(np.mean((predicted - y) ** 2)))
    constant_rmse = float(np.sqrt(np.mean((constant - y) ** 2)))
    variance = float(np.var(y))
    return {"rmse": rmse, "r2": 1.0 - rmse ** 2 / variance if variance > 0 else None,
            "constant_rmse": constant_rmse, "transitions": int(y.size)}
