"""The project's one multilayer perceptron: init and forward pass over a list of layers.

A layer is a dict {"kernel": (fan_in, features), "bias": (features,)}; an MLP
is a list of layers, input to output. Every network of the project is built
on `mlp` (the forward pass) and `init_mlp` / `MLP` (the initialisation):

  * PerSim's state and action encoders (`persim_jax.persim.model`) and its
    folded forward pass for planning (`small_fan_in`);
  * CaDM's context encoder and forward / backward trunks (`persim_jax.methods.cadm`,
    its own truncated-normal init and its {"w", "b"} trees);
  * BCQ's Q-nets, VAE, actor and critics (`persim_jax.methods.bcq`);
  * the logging policies' Q-networks, actors and critics
    (`experiments.datagen.policies`, flax `Dense` initialisation).

The differences between these networks that change numbers are arguments
here, not separate implementations: the activation, whether the output
layer is activated too, the dense product of small fan-ins, the initialiser
and how the PRNG key reaches each layer (one split per layer for
`init_mlp`; flax's per-module key derivation for `MLP`), and the names of
the layers in a flax parameter tree.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Layer = dict          # {"kernel": (fan_in, features), "bias": (features,)}
Initializer = Callable[[jax.Array, tuple, Any], jax.Array]

# Layer names of an `MLP`'s flax parameter tree: "named" (hidden_0, hidden_1,
# ..., output; PerSim and BCQ) or "dense" (Dense_0, Dense_1, ...; the logging
# policies, whose saved files use flax's automatic `nn.Dense` names).
LAYER_NAMES = ("named", "dense")
# Initialisations of `MLP`: "torch" (PyTorch's nn.Linear: kernel and bias
# U(±1/√fan_in)) or "lecun" (flax nn.Dense: LeCun-normal kernel, zero bias).
INIT_SCHEMES = ("torch", "lecun")


# ---------------------------------------------------------------------------
# Forward pass


def dense(layer: Layer, x: jax.Array, small_fan_in: int = 0) -> jax.Array:
    """(..., features) = x W + b for x (..., fan_in).

    Args:
      layer: {"kernel": (fan_in, features), "bias": (features,)}.
      x: (..., fan_in) inputs.
      small_fan_in: a layer with at most this many inputs is computed as a
        sum of broadcast products (b + Σ_i x_i W_i), which XLA fuses with the
        bias and activation into one loop; a matmul on a 2- or 4-wide input
        runs far below the matmul rate (PerSim's planning). 0: always a
        matmul.
    """
    kernel, bias = layer["kernel"], layer["bias"]
    if kernel.shape[0] <= small_fan_in:
        out = bias
        for i in range(kernel.shape[0]):
            out = out + x[..., i:i + 1] * kernel[i]
        return out
    return x @ kernel + bias


def mlp(layers: Sequence[Layer], x: jax.Array, activation: Callable = jax.nn.relu, *,
        activate_output: bool = False, small_fan_in: int = 0) -> jax.Array:
    """The forward pass of `layers` on x (..., fan_in) -> (..., features).

    Args:
      layers: the layers, input to output (`layer_list` reads them off a
        parameter tree).
      x: (..., fan_in) inputs.
      activation: applied after every hidden layer.
      activate_output: apply it after the output layer too (CaDM's trunks,
        whose heads are separate layers); default: a linear output.
      small_fan_in: see `dense`.
    """
    for layer in layers[:-1]:
        x = activation(dense(layer, x, small_fan_in))
    x = dense(layers[-1], x, small_fan_in)
    return activation(x) if activate_output else x


def layer_list(tree: dict) -> list[Layer]:
    """The layers of an `MLP`'s parameter tree, input to output (a new list):
    hidden_0, hidden_1, ..., output ("named") or Dense_0, Dense_1, ...
    ("dense")."""
    if "output" in tree:
        names = sorted((k for k in tree if k.startswith("hidden_")), key=lambda k: int(k[7:]))
        return [tree[k] for k in names] + [tree["output"]]
    names = sorted((k for k in tree if k.startswith("Dense_")), key=lambda k: int(k[6:]))
    return [tree[k] for k in names]


def hidden_sizes(layers: Sequence[Layer]) -> tuple[int, ...]:
    """The hidden widths of `layers` (all but the output layer's)."""
    return tuple(int(layer["bias"].shape[-1]) for layer in layers[:-1])


# ---------------------------------------------------------------------------
# Initialisation


def torch_uniform(fan_in: int) -> Initializer:
    """U(±1/√fan_in), PyTorch's nn.Linear default for both kernel and bias."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def zeros(key, shape, dtype=jnp.float32) -> jax.Array:
    """A zero initialiser (the key is not used)."""
    del key
    return jnp.zeros(shape, dtype)


def init_dense(key: jax.Array, fan_in: int, features: int,
               kernel_init: Callable[[int], Initializer], bias_init: Initializer = zeros
               ) -> Layer:
    """One layer: kernel_init(fan_in)(key, (fan_in, features)), bias from
    bias_init(key, (features,)) (the same key: a zero bias ignores it)."""
    return {"kernel": kernel_init(fan_in)(key, (fan_in, features), jnp.float32),
            "bias": bias_init(key, (features,), jnp.float32)}


def init_mlp(key: jax.Array, sizes: Sequence[int], kernel_init: Callable[[int], Initializer],
             bias_init: Initializer = zeros) -> list[Layer]:
    """Layers of sizes[0] -> sizes[1] -> ... -> sizes[-1], one key each:
    layer i gets split(key, len(sizes) - 1)[i] (`init_dense`).

    Args:
      key: PRNG key.
      sizes: input size, hidden sizes, output size.
      kernel_init: fan_in -> initialiser of the (fan_in, features) kernel.
      bias_init: initialiser of the (features,) bias.
    """
    keys = jax.random.split(key, len(sizes) - 1)
    return [init_dense(keys[i], sizes[i], sizes[i + 1], kernel_init, bias_init)
            for i in range(len(sizes) - 1)]


# ---------------------------------------------------------------------------
# The flax wrapper


class LayerParams(nn.Module):
    """Declares one layer's parameters ("kernel", then "bias", as flax's
    `nn.Dense`, so that the keys they are drawn with are Dense's) and returns
    them as a `Layer`."""

    fan_in: int
    features: int
    init_scheme: str = "torch"

    @nn.compact
    def __call__(self) -> Layer:
        if self.init_scheme == "torch":
            kernel_init = bias_init = torch_uniform(self.fan_in)
        else:
            kernel_init, bias_init = nn.initializers.lecun_normal(), nn.initializers.zeros_init()
        kernel = self.param("kernel", kernel_init, (self.fan_in, self.features), jnp.float32)
        bias = self.param("bias", bias_init, (self.features,), jnp.float32)
        return {"kernel": kernel, "bias": bias}


class MLP(nn.Module):
    """Activated hidden layers, linear output: `mlp` as a flax module.

    Call with x (..., fan_in); returns (..., features). The parameters are
    one {"kernel", "bias"} dict per layer, named by `layer_names`
    (`LAYER_NAMES`) and initialised by `init_scheme` (`INIT_SCHEMES`).
    """

    hidden: Sequence[int]
    features: int
    init_scheme: str = "torch"
    layer_names: str = "named"
    activation: Callable = nn.relu

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        sizes = (*self.hidden, self.features)
        layers, fan_in = [], x.shape[-1]
        for i, size in enumerate(sizes):
            if self.layer_names == "dense":
                name = f"Dense_{i}"
            else:
                name = "output" if i == len(sizes) - 1 else f"hidden_{i}"
            layers.append(LayerParams(fan_in, size, self.init_scheme, name=name)())
            fan_in = size
        return mlp(layers, x, self.activation)


def apply_mlp(tree: dict, x: jax.Array, activation: Callable = jax.nn.relu) -> jax.Array:
    """The forward pass of an `MLP`'s parameter tree (sizes read off it)."""
    return mlp(layer_list(tree), x, activation)
