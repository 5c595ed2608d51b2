"""The run config of `experiments.run`: one frozen, validated dataclass built
from the registry (`experiments.paper`) and the CLI's flags.

    config = config.resolve("cartpole", "pure", "quick", {"epochs": 50})
    config.training()          # persim_jax.TrainConfig for PerSim
    config.planner_fields()    # {"num_candidates": 1000, ...} for paper.planner

`dataclasses.asdict(config)` is what `results.json["config"]` records.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from experiments import paper
from experiments.datagen.datasets import DATASETS
from persim_jax import methods
from persim_jax.persim.train import TrainConfig

# RunConfig field -> the planner config field it sets, for (discrete,
# continuous) actions; None: not a setting of that planner.
PLANNER_FIELDS = {
    "candidates": ("num_candidates", "num_samples"),
    "horizon": ("horizon", "horizon"),
    "cem_rounds": (None, "num_rounds"),
    "cem_elites": (None, "num_elites"),
    "aggregation": ("aggregation", "aggregation"),
    "discount": ("discount", "discount"),
}

# The planners a run can play, and iCEM's default size: the fraction of the
# paper CEM's sequences per plan at which it matched it (benchmarks/RESULTS.md).
PLANNER_KINDS = ("paper", "icem")
ICEM_BUDGET = 0.25

_POSITIVE = ("trials", "num_agents", "ensemble_size", "epochs", "batch_size", "episodes",
             "prediction_episodes", "candidates", "horizon", "cem_elites", "max_steps",
             "policy_episodes", "open_loop_steps")


class UserError(Exception):
    """A problem with the user's input: reported in one line, exit code 2."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run of `experiments.run` depends on besides env, dataset,
    seed and paths. None leaves a planner setting at the paper's value.

    Attributes:
      trials: independent training seeds (paper: 5).
      num_agents: agents of a generated dataset (paper: 500).
      rank, ensemble_size, epochs, batch_size, learning_rate,
        lr_halving_epochs, state_hidden, action_hidden, standardize: PerSim's
        training (`persim_jax.TrainConfig`); lr_halving_epochs None keeps the
        step size constant.
      episodes: MPC episodes per test agent and trial (paper: 20).
      max_steps: steps per MPC episode (None: the env's cap).
      prediction_episodes: episodes per test agent of the prediction test.
      true_env_mpc: also plan on the true physics (the upper-bound row).
      planner: "paper" (random shooting for discrete actions, CEM for
        continuous ones, the paper's sizes) or "icem" (continuous actions:
        `paper.icem_config` at `ICEM_BUDGET` of the paper CEM's sequences).
      candidates, horizon, cem_rounds, cem_elites, aggregation, discount:
        planner overrides (see PLANNER_FIELDS; for iCEM, candidates is the
        first round's population).
      methods: the compared methods' names (`persim_jax.methods.REGISTRY`,
        or "all"; PerSim always runs); None: PerSim, and True env + MPC when
        `true_env_mpc`.
      policy_episodes: episodes per test agent of the model-free methods
        (paper: 100).
      method_settings: {method name: {config field: value}}: each method's
        own settings (its `from_settings`), set by the preset and the flags
        the methods declare (`Method.settings`: --bcq_iterations,
        --cadm_iterations, ...).
      open_loop_steps: own data: k of the held-out k-step open-loop error
        (None: `experiments.personalisation.DEFAULT_OPEN_LOOP_STEPS`).
    """

    trials: int
    num_agents: int
    rank: int | str
    ensemble_size: int
    epochs: int
    batch_size: int
    learning_rate: float
    lr_halving_epochs: int | None
    state_hidden: tuple[int, ...]
    action_hidden: tuple[int, ...]
    standardize: bool
    episodes: int
    max_steps: int | None
    prediction_episodes: int
    true_env_mpc: bool
    planner: str = "paper"
    candidates: int | None = None
    horizon: int | None = None
    cem_rounds: int | None = None
    cem_elites: int | None = None
    aggregation: str | None = None
    discount: float | None = None
    methods: tuple[str, ...] | None = None
    policy_episodes: int | None = None
    open_loop_steps: int | None = None
    method_settings: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.methods is not None:
            object.__setattr__(self, "methods", tuple(str(m) for m in self.methods))
        if self.rank != "auto":
            object.__setattr__(self, "rank", _positive_int("rank", self.rank))
        object.__setattr__(self, "state_hidden",
                           tuple(_positive_int("state_hidden", h) for h in self.state_hidden))
        object.__setattr__(self, "action_hidden",
                           tuple(_positive_int("action_hidden", h) for h in self.action_hidden))
        if self.lr_halving_epochs is not None and self.lr_halving_epochs < 0:
            raise UserError(f"--lr_halving_epochs: must be >= 0 (0: constant); got "
                            f"{self.lr_halving_epochs}")
        # 0 means a constant step size, as None.
        object.__setattr__(self, "lr_halving_epochs", self.lr_halving_epochs or None)
        for name in _POSITIVE:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name}: must be a positive integer; got {value}")
        if self.planner not in PLANNER_KINDS:
            raise UserError(f"--planner: unknown {self.planner!r}; valid: "
                            f"{', '.join(PLANNER_KINDS)}")
        if self.cem_rounds is not None and self.cem_rounds < 0:
            raise UserError(f"--cem_rounds: must be >= 0; got {self.cem_rounds}")
        if not self.learning_rate > 0:
            raise UserError(f"--learning_rate: must be positive; got {self.learning_rate}")

    def training(self) -> TrainConfig:
        """PerSim's training config."""
        try:
            return TrainConfig(
                rank=self.rank, ensemble_size=self.ensemble_size, epochs=self.epochs,
                batch_size=self.batch_size, learning_rate=self.learning_rate,
                lr_halving_epochs=self.lr_halving_epochs, state_hidden=self.state_hidden,
                action_hidden=self.action_hidden, standardize=self.standardize)
        except ValueError as error:
            raise UserError(f"training settings: {error}") from None

    def method_names(self, available: tuple[str, ...]) -> tuple[str, ...]:
        """The methods this run compares, in `available`'s order. PerSim
        always runs: the run's factors, figures and report are about it."""
        if self.methods is None:
            return ("persim", "true_env_mpc") if self.true_env_mpc else ("persim",)
        names = available if "all" in self.methods else self.methods
        if "all" in self.methods and not self.true_env_mpc and "true_env_mpc" not in self.methods:
            # "all" compares the methods; the upper-bound row follows the
            # run's true_env_mpc (`--notrue_env_mpc` leaves it out).
            names = tuple(name for name in names if name != "true_env_mpc")
        unknown = [name for name in names if name not in available]
        if unknown:
            raise UserError(f"--methods: unknown {', '.join(unknown)}; valid: "
                            f"{', '.join(available)}, or all")
        return tuple(name for name in available if name in names or name == "persim")

    def planner_config(self, env):
        """The planner config of this run for `env`: the paper's (or iCEM
        sized by `ICEM_BUDGET`), then the run's overrides. UserError names a
        bad combination."""
        try:
            if self.planner == "icem":
                if env.discrete_actions:
                    raise ValueError(f"{env.name} has discrete actions; --planner=icem plans "
                                     "continuous ones")
                return dataclasses.replace(paper.icem_config(env, ICEM_BUDGET),
                                           **self.planner_fields(discrete=False))
            return paper.planner_config(env, **self.planner_fields(env.discrete_actions))
        except ValueError as error:
            raise UserError(f"planner settings: {error}") from None

    def planner_fields(self, discrete: bool) -> dict[str, Any]:
        """The planner fields this run overrides, for discrete or continuous
        actions (see PLANNER_FIELDS)."""
        fields = {}
        for name, targets in PLANNER_FIELDS.items():
            target = targets[0 if discrete else 1]
            if target is not None and getattr(self, name) is not None:
                fields[target] = getattr(self, name)
        return fields


# What a preset or an override may set: RunConfig's fields, and the methods'
# settings by their flags' names (`methods.setting_flags()`), which `resolve`
# gathers into `method_settings`.
METHOD_FLAGS = tuple(methods.setting_flags())
OVERRIDABLE = tuple(f.name for f in dataclasses.fields(RunConfig)
                    if f.name != "method_settings") + METHOD_FLAGS


def resolve(env_name: str | None, dataset: str, preset: str = "quick",
            overrides: dict[str, Any] | None = None) -> RunConfig:
    """The run's config: the registry's preset for the env (`paper.PRESETS`),
    or `paper.CUSTOM` for the user's own data without an env, overridden by
    `overrides` (None values ignored). UserError names a bad setting."""
    custom = dataset not in DATASETS
    if not custom and env_name is None:
        raise UserError(f"--env is required for the paper's datasets "
                        f"(one of {', '.join(paper.PRESETS['paper'])})")
    if preset not in paper.PRESETS:
        raise UserError(f"--preset: unknown {preset!r}; valid: {', '.join(paper.PRESETS)}")
    settings = dict(paper.CUSTOM if env_name is None else paper.PRESETS[preset][env_name])
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise UserError(f"unknown setting(s) {unknown}; valid: {', '.join(OVERRIDABLE)}")
    settings.update(overrides)
    for flag in METHOD_FLAGS:
        value = settings.get(flag)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UserError(f"--{flag}: must be a positive integer; got {value!r}")
    method_settings = methods.settings_from_flags(settings)
    config = RunConfig(**{k: v for k, v in settings.items() if k not in METHOD_FLAGS},
                       method_settings=method_settings)
    if env_name is not None and not custom and config.num_agents < 5:
        raise UserError(f"--num_agents: the dataset needs at least the 5 test agents; got "
                        f"{config.num_agents}")
    return config


def _positive_int(name: str, text) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise UserError(f"--{name}: expected a positive integer; got {text!r}") from None
    if value < 1:
        raise UserError(f"--{name}: expected a positive integer; got {text!r}")
    return value
