"""Moved: `persim_jax.persim.newcomers`. This re-export keeps the old imports
working until their callers are updated (issue 28)."""

from persim_jax.persim.newcomers import (  # noqa: F401
    CHUNK,
    DEFAULT_RIDGE,
    RELATIVE_CURVATURE_CUTOFF,
    add_agents,
    check_newcomers,
    default_ridge,
    factor_prior,
    fit_factors,
    normal_equations,
    solve_factors,
)
