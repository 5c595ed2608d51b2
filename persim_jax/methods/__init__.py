"""The methods the experiment harness compares, behind one small protocol
(`base`): every row of the paper's tables learns from the offline
`Transitions` (or not at all) and hands the evaluation protocols what they
consume for the agents under test: dynamics (`ModelBased`: prediction error
and MPC reward) or a policy (`ModelFree`: reward only).

    from persim_jax import methods
    method = methods.PerSim(TrainConfig(rank=5, epochs=300))
    trained = method.train(transitions, method.key("train", seed=0), workdir="runs/ckpt")
    dynamics_for_agent = method.dynamics_for_agent(trained, agent_ids=[0, 1, 2, 3, 4])

A new method is one module here (a `Method` subclass holding its frozen
config, with `from_settings`) and one line in `REGISTRY`.
"""

from persim_jax.methods.base import (
    STAGE_OFFSETS,
    Method,
    ModelBased,
    ModelFree,
    Trains,
    stage_key,
)
from persim_jax.methods.bcq import BCQA, BCQP
from persim_jax.methods.cadm import PETSCaDM, VanillaCaDM
from persim_jax.methods.per_agent import PerAgent
from persim_jax.methods.persim import PerSim
from persim_jax.methods.population import Population, pooled
from persim_jax.methods.true_env import TrueEnvMPC

# The harness's methods by name (`--methods`, `results.json["methods"]`), in
# the reports' order.
REGISTRY: dict[str, type[Method]] = {
    PerSim.name: PerSim,
    TrueEnvMPC.name: TrueEnvMPC,
    VanillaCaDM.name: VanillaCaDM,
    PETSCaDM.name: PETSCaDM,
    BCQP.name: BCQP,
    BCQA.name: BCQA,
    Population.name: Population,
    PerAgent.name: PerAgent,
}



def setting_flags() -> dict[str, str]:
    """{flag: help} of every method's settings (`Method.settings`): the
    command-line flags that set fields of the methods' configs."""
    return {flag: help_text for method in REGISTRY.values()
            for flag, (_, help_text) in method.settings.items()}


def settings_from_flags(values) -> dict[str, dict]:
    """{method name: {config field: value}} from flag-named `values` ({flag:
    value}; None and other keys ignored): what each method's `from_settings`
    takes. Methods that share a flag get its value each."""
    settings = {}
    for name, method in REGISTRY.items():
        fields = {field: values[flag] for flag, (field, _) in method.settings.items()
                  if values.get(flag) is not None}
        if fields:
            settings[name] = fields
    return settings


__all__ = [
    "BCQA", "BCQP", "Method", "ModelBased", "ModelFree", "PETSCaDM", "PerAgent", "PerSim",
    "Population", "REGISTRY", "STAGE_OFFSETS", "Trains", "TrueEnvMPC", "VanillaCaDM", "pooled",
    "setting_flags", "settings_from_flags", "stage_key",
]
