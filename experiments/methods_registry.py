"""The harness's compared methods, by name, in the reports' order: how each is
built from the env and the run's config."""

from __future__ import annotations

import dataclasses

from experiments.config import RunConfig, UserError
from persim_jax import methods


def _bcq(kind):
    def make(env, config: RunConfig):
        from persim_jax import bcq

        return kind(bcq)(bcq.BCQConfig(iterations=config.bcq_iterations))
    return make


def _cadm(probabilistic: bool):
    def make(env, config: RunConfig):
        from persim_jax import cadm

        base, kind = (cadm.PE_TS, cadm.PETSCaDM) if probabilistic else (cadm.VANILLA,
                                                                        cadm.VanillaCaDM)
        fields = {"pairs_per_epoch": config.cadm_pairs_per_epoch}
        if config.cadm_iterations is not None:
            fields["iterations"] = config.cadm_iterations
        if probabilistic and config.cadm_particles is not None:
            fields["particles"] = config.cadm_particles
        try:
            return kind(dataclasses.replace(base, **fields))
        except ValueError as error:
            raise UserError(f"CaDM settings: {error}") from None
    return make


METHODS = {
    "persim": lambda env, config: methods.PerSim(config.training()),
    "true_env_mpc": lambda env, config: methods.TrueEnvMPC(env),
    "vanilla_cadm": _cadm(probabilistic=False),
    "pe_ts_cadm": _cadm(probabilistic=True),
    "bcq_p": _bcq(lambda bcq: bcq.BCQP),
    "bcq_a": _bcq(lambda bcq: bcq.BCQA),
    "population": lambda env, config: methods.Population(config.training()),
    "per_agent": lambda env, config: methods.PerAgent(config.training()),
}


def methods_for(env, config: RunConfig) -> list[methods.Method]:
    """The methods a run compares (`RunConfig.method_names`); without an env
    (own data, no test agents), PerSim only."""
    names = config.method_names(tuple(METHODS))
    if env is None:
        if set(names) - {"persim", "true_env_mpc"}:
            raise UserError("--methods: comparing methods needs --env (the test agents' "
                            "true physics); own data without an env trains PerSim only")
        names = ("persim",)
    return [METHODS[name](env, config) for name in names]
