"""Moved: `persim_jax.persim.model` (the network, `NormStats`, the folded forward
pass) and `persim_jax.persim.simulator` (`Simulator`). This re-export keeps the
old imports working until their callers are updated (issue 28)."""

from persim_jax.networks import MLP, torch_uniform  # noqa: F401
from persim_jax.persim.model import (  # noqa: F401
    SMALL_FAN_IN,
    STD_EPS,
    ModelConfig,
    NormStats,
    OneHotLinear,
    Params,
    PerSimNet,
    agent_factors,
    apply,
    compute_stats,
    count_params,
    factor_features,
    fold_member,
    folded_next_obs,
    identity_stats,
    init_params,
    mlp_layers,
    predict_next_obs,
)
from persim_jax.persim.simulator import (  # noqa: F401
    SIMULATOR_FORMAT,
    SIMULATOR_VERSION,
    Simulator,
)
