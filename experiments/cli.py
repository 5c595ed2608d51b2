"""What the experiments' command lines share: the run config's flags, the
own-data loader's flags, progress lines, and the one-line error exit.

Flags are defined only when a command runs as a program (`define_*` from its
`__main__` block): several experiments modules define `--env`, and tests import
them side by side.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
from typing import Callable

from absl import flags, logging

import envs
from experiments import config as config_lib
from experiments import paper
from experiments.config import RunConfig, UserError
from experiments.own_data import LOADER_DEFAULTS
from persim_jax import methods

FLAGS = flags.FLAGS


def define_training_flags() -> None:
    """Flags of PerSim's training and the generated dataset's size."""
    flags.DEFINE_integer("trials", None, "Independent training seeds (paper: 5).")
    flags.DEFINE_integer("num_agents", None, "Agents in a generated dataset (paper: 500).")
    flags.DEFINE_string("rank", None, "Latent factors r, or 'auto' (chosen by validation).")
    flags.DEFINE_integer("ensemble_size", None, "Ensemble members M (paper: 5).")
    flags.DEFINE_integer("epochs", None, "Training epochs (paper: 300).")
    flags.DEFINE_integer("batch_size", None,
                         "Minibatch size (paper: 256; here CartPole 64, MountainCar 32).")
    flags.DEFINE_float("learning_rate", None, "Adam step size (paper: 1e-3).")
    flags.DEFINE_integer("lr_halving_epochs", None,
                         "Halve the step size every this many epochs (paper: 150); 0 keeps it "
                         "constant.")
    flags.DEFINE_bool("standardize", None,
                      "Standardise model inputs and Δ targets (default: raw for CartPole and "
                      "MountainCar, as the authors' code; standardised for HalfCheetah and "
                      "your own data).")
    flags.DEFINE_list("state_hidden", None, "Hidden sizes of the state encoder, e.g. 256,512,512.")
    flags.DEFINE_list("action_hidden", None,
                      "Hidden sizes of the continuous action encoder (paper: 256,256).")


def define_planner_flags() -> None:
    """Flags of the planner and the evaluation protocol."""
    flags.DEFINE_enum("planner", None, list(config_lib.PLANNER_KINDS),
                      "paper: random shooting / CEM as the paper; icem: iCEM (continuous "
                      "actions) at a quarter of the paper CEM's model evaluations.")
    flags.DEFINE_integer("candidates", None,
                         "Random-shooting candidates (paper: 1000), CEM samples (paper: 200) or "
                         "iCEM's first population.")
    flags.DEFINE_integer("horizon", None, "Planning horizon (paper: 30; MountainCar 50).")
    flags.DEFINE_integer("cem_rounds", None, "CEM refinement rounds after the first (paper: 5).")
    flags.DEFINE_integer("cem_elites", None, "CEM elites (paper: 50).")
    flags.DEFINE_enum("aggregation", None, ["min", "mean"],
                      "Ensemble aggregation of candidate returns (paper: min).")
    flags.DEFINE_float("discount", None, "Planning discount (paper: 0.93).")
    flags.DEFINE_integer("episodes", None, "MPC episodes per test agent and trial (paper: 20).")
    flags.DEFINE_integer("max_steps", None, "Steps per MPC episode (default: the env's cap).")
    flags.DEFINE_integer("prediction_episodes", None,
                         "Episodes per test agent of the prediction-error test (paper: 200).")
    flags.DEFINE_integer("open_loop_steps", None,
                         "Own data: k of the held-out k-step open-loop error (default 10).")


def define_method_flags() -> None:
    """Flags choosing the compared methods, the model-free methods' episodes,
    and every method's own settings (`Method.settings`, e.g. --bcq_iterations)."""
    flags.DEFINE_bool("true_env_mpc", None, "Also plan on the true physics (the upper-bound row).")
    flags.DEFINE_list("methods", None,
                      f"Methods to compare: {', '.join(methods.REGISTRY)}, or all (default: "
                      f"persim, and true_env_mpc unless --notrue_env_mpc).")
    flags.DEFINE_integer("policy_episodes", None,
                         "Episodes per test agent of the model-free methods (paper: 100).")
    for flag, help_text in methods.setting_flags().items():
        flags.DEFINE_integer(flag, None, help_text)


def define_config_flags() -> None:
    """A flag for every `RunConfig` field (None: the preset's value)."""
    define_training_flags()
    define_planner_flags()
    define_method_flags()
    missing = set(config_lib.OVERRIDABLE) - set(FLAGS)
    assert not missing, f"RunConfig fields without a flag: {sorted(missing)}"


def define_loader_flags() -> None:
    """Own data in long format (.csv / .parquet): which columns hold what."""
    flags.DEFINE_string("agent_column", "agent_id",
                        "Own data: the agent id column (any ids, e.g. adult#001; mapped to "
                        "0..N-1, and every per-agent output keeps your ids).")
    flags.DEFINE_string("time_column", "time",
                        "Own data: the time-step column; '' if the rows of each agent are in "
                        "time order.")
    flags.DEFINE_string("state_prefix", "obs_", "Own data: state columns start with this.")
    flags.DEFINE_string("action_prefix", "action", "Own data: action columns start with this.")
    flags.DEFINE_string("covariate_prefix", "cov_",
                        "Own data: covariate columns (one value per agent, repeated on its "
                        "rows) start with this; '' for none.")
    flags.DEFINE_bool("discrete_actions", None,
                      "Own data: the one action column holds discrete actions 0..K-1 "
                      "(default: inferred, discrete when every value is an integer).")
    flags.DEFINE_bool("allow_outliers", False,
                      "Own data: accept values more than 1e6 times their column's typical "
                      "magnitude (by default an error naming the line and column).")


def define_decision_flags() -> None:
    """Own data: decisions (`experiments.decisions`)."""
    flags.DEFINE_bool("decide", False,
                      "Own data: a recommended plan per agent and each policy's value per agent "
                      "on its simulator (experiments/decisions.py).")
    flags.DEFINE_string("reward", None,
                        "Own data: your reward, FILE.py:FUNCTION or package.module:function, "
                        "reward(obs, action, next_obs) -> scalar in JAX (default: the env's, "
                        "else a reward model fitted on the file's reward column).")
    flags.DEFINE_string("terminated", None,
                        "Own data: your termination, FILE.py:FUNCTION, terminated(next_obs) -> "
                        "bool (default: the env's, else none).")
    flags.DEFINE_list("policies", [],
                      "Own data: your candidate policies, FILE.py:FUNCTION,..., each "
                      "policy(key, obs) -> action; valued beside the logged actions and MPC.")
    flags.DEFINE_list("decision_agents", None, "Own data: the agents (your ids) to decide for; "
                      "default all.")
    flags.DEFINE_integer("decision_horizon", 20, "Own data: steps of each policy's value.")
    flags.DEFINE_integer("decision_starts", 4,
                         "Own data: logged states per agent each policy is valued from.")
    flags.DEFINE_list("action_low", None, "Own data: continuous actions' lower bound (one value "
                      "or one per dimension; default: the data's per-column minimum).")
    flags.DEFINE_list("action_high", None, "Own data: continuous actions' upper bound (default: "
                      "the data's per-column maximum).")


def decision_request_from_flags():
    """The `decisions.DecisionRequest` of the flags, or None without --decide
    (a decision flag without --decide is an error, not silently ignored)."""
    from experiments import decisions

    given = [name for name in ("reward", "terminated", "policies", "decision_agents",
                               "action_low", "action_high") if FLAGS[name].present]
    if not FLAGS.decide:
        if given:
            raise UserError(f"--{given[0]}: applies with --decide")
        return None

    def floats(name):
        values = FLAGS[name].value
        if values is None:
            return None
        try:
            return tuple(float(v) for v in values)
        except ValueError:
            raise UserError(f"--{name}: expected numbers; got {','.join(values)}") from None

    return decisions.DecisionRequest(
        reward=FLAGS.reward, terminated=FLAGS.terminated, policies=tuple(FLAGS.policies),
        agents=None if FLAGS.decision_agents is None else tuple(FLAGS.decision_agents),
        horizon=FLAGS.decision_horizon, starts=FLAGS.decision_starts,
        action_low=floats("action_low"), action_high=floats("action_high"))


def overrides_from_flags() -> dict:
    """The `RunConfig` fields the command line sets (None: the preset's), of
    the flags this command defines."""
    return {name: FLAGS[name].value for name in config_lib.OVERRIDABLE if name in FLAGS}


def settings_from_flags(env_name, dataset: str, preset: str) -> RunConfig:
    """The run's config: the preset, then every flag given."""
    return config_lib.resolve(env_name, dataset, preset, overrides_from_flags())


def loader_options_from_flags() -> dict:
    return {name: getattr(FLAGS, name) for name in LOADER_DEFAULTS}


def show_progress() -> None:
    """Our progress lines at INFO; the libraries' INFO lines (orbax logs every
    checkpoint) hidden unless --verbosity is given."""
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.INFO)
        import persim_jax

        ours = tuple(os.path.dirname(os.path.abspath(module.__file__)) + os.sep
                     for module in (persim_jax, envs, paper))
        # Python's level numbers: absl's logging.WARNING is on its own scale (-1).
        logging.get_absl_handler().addFilter(
            lambda record: (record.levelno >= std_logging.WARNING
                            or os.path.abspath(record.pathname).startswith(ours)))


def exit_on_user_error(body: Callable[[], int]) -> int:
    """Runs `body`; a UserError is printed in one line and exits with 2."""
    try:
        return body()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
