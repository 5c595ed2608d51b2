"""Decisions on the user's own data (`experiments.run --decide`): the user's
reward, a recommended plan per agent, and each policy's value per agent on its
simulator with the ensemble's spread and the population model's value.

    python -m experiments.run --dataset=logs.csv --reward=my_reward.py:reward --decide \\
        --policies=my_policies.py:cautious,my_policies.py:bold --decision_horizon=20

The reward is, in this order: `--reward=FILE.py:FUNCTION` (or
`package.module:function`), the env's own reward when `--env` is given, or a
reward model fitted on the file's `reward` column (`persim_jax.reward_model`,
its held-out error reported). `--terminated=...` is optional (the env's with
`--env`).

For each agent (`--decision_agents`, default all):
  * the planner's recommended next action and plan, from the agent's last
    logged state, on its own simulator with the user's reward;
  * the value of each policy over `--decision_horizon` steps from
    `--decision_starts` of the agent's logged states (evenly spaced, each with
    at least H logged steps after it): the logged actions replayed ("logged"),
    the MPC planner ("mpc", planning on the agent's own ensemble) and each
    user policy, under every member of its simulator (min / mean / max) and
    under the population model (the mean over its members);
  * which policy its simulator ranks first and the share of members that agree.

Cost: the MPC value plans once per step, start, member and agent, on PerSim's
members and again on the population model's: 2 · K · S · M · H plans.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.cache import say
from experiments.config import RunConfig, UserError
from persim_jax import data, decisions, planning
from persim_jax.evaluation.episodes import PolicyActor
from persim_jax.reward_model import fit_reward_model
from persim_jax.simulator_env import SimulatorEnv, logged_initial_states

BUILT_IN = ("logged", "mpc")
# Agents shown one per line in report.md; results.json has every agent.
REPORT_AGENTS = 20


@dataclasses.dataclass(frozen=True)
class DecisionRequest:
    """What `--decide` and its flags ask for.

    Attributes:
      reward: "FILE.py:FUNCTION" / "package.module:function", or None.
      terminated: the same for the termination, or None.
      policies: the user's candidate policies, as such specs.
      agents: the agents' ids (as in the file) to decide for; None: all.
      horizon: H, steps of each policy value.
      starts: S, logged start states per agent.
      action_low, action_high: continuous actions' range (one value or one
        per dimension); None: the data's per-column range.
    """

    reward: str | None = None
    terminated: str | None = None
    policies: tuple[str, ...] = ()
    agents: tuple[str, ...] | None = None
    horizon: int = 20
    starts: int = 4
    action_low: tuple[float, ...] | None = None
    action_high: tuple[float, ...] | None = None

    def __post_init__(self):
        for name in ("horizon", "starts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"--decision_{name}: must be a positive integer; got {value!r}")


# ---------------------------------------------------------------------------
# The user's functions


def load_function(spec: str, flag: str) -> Callable:
    """The function named by "path/to/file.py:name" or "package.module:name";
    UserError naming `flag` for any problem."""
    if not isinstance(spec, str) or spec.count(":") < 1:
        raise UserError(f"--{flag}: expected FILE.py:FUNCTION or package.module:function; "
                        f"got {spec!r}")
    where, name = spec.rsplit(":", 1)
    try:
        if where.endswith(".py") or os.sep in where:
            if not os.path.isfile(where):
                raise UserError(f"--{flag}: no such file: {where}")
            module_name = f"_persim_user_{abs(hash(os.path.abspath(where)))}"
            spec_ = importlib.util.spec_from_file_location(module_name, where)
            module = importlib.util.module_from_spec(spec_)
            sys.modules[module_name] = module
            spec_.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except UserError:
        raise
    except Exception as error:        # the user's module failed to import
        raise UserError(f"--{flag}: {where} failed to load: {type(error).__name__}: "
                        f"{error}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UserError(f"--{flag}: {where} has no function {name!r}")
    return function


def _call_on_batch(function, flag: str, *args):
    try:
        return np.asarray(jax.vmap(function)(*args))
    except Exception as error:
        raise UserError(f"--{flag}: {getattr(function, '__name__', 'the function')} failed on a "
                        f"batch of the data's transitions: {type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}") from None


def check_reward(function, transitions, flag: str = "reward") -> None:
    """UserError unless `function` gives one finite number per transition on
    the data's first transitions."""
    sample = np.arange(min(16, transitions.num_transitions))
    obs, action, next_obs = (np.asarray(x)[sample] for x in
                             (transitions.obs, transitions.action, transitions.next_obs))
    values = _call_on_batch(function, flag, obs, action, next_obs)
    if values.shape != (len(sample),):
        raise UserError(f"--{flag}: must return one number per transition; got shape "
                        f"{values.shape[1:]} per transition")
    if not np.all(np.isfinite(values.astype(np.float64))):
        raise UserError(f"--{flag}: returned NaN or infinite rewards on the data's transitions")


def check_terminated(function, transitions) -> None:
    """UserError unless `function` gives one boolean per state."""
    sample = np.arange(min(16, transitions.num_transitions))
    values = _call_on_batch(function, "terminated", np.asarray(transitions.next_obs)[sample])
    if values.shape != (len(sample),):
        raise UserError(f"--terminated: must return one boolean per state; got shape "
                        f"{values.shape[1:]} per state")


def check_policy(function, spec: str, transitions) -> None:
    """UserError unless `function(key, obs)` gives a valid action per state."""
    sample = np.arange(min(16, transitions.num_transitions))
    keys = jax.random.split(jax.random.PRNGKey(0), len(sample))
    actions = _call_on_batch(function, "policies", keys, np.asarray(transitions.obs)[sample])
    expected = (len(sample),) if transitions.discrete else (len(sample), transitions.action_dim)
    if actions.shape != expected:
        raise UserError(f"--policies: {spec} must return "
                        f"{'one integer action' if transitions.discrete else f'a ({transitions.action_dim},) action'} "
                        f"per state; got shape {actions.shape[1:]}")
    if transitions.discrete and (actions.min() < 0 or actions.max() >= transitions.num_actions):
        raise UserError(f"--policies: {spec} returned actions outside 0.."
                        f"{transitions.num_actions - 1}")
    if not np.all(np.isfinite(actions.astype(np.float64))):
        raise UserError(f"--policies: {spec} returned NaN or infinite actions")


# ---------------------------------------------------------------------------
# The pieces of a decision


@dataclasses.dataclass
class Reward:
    """The reward and termination a decision optimises (per transition), and
    where the reward came from ("function", "env" or "model" with its error)."""

    reward: Callable
    terminated: Callable | None
    source: dict


def action_box(request: DecisionRequest, transitions) -> decisions.ActionBox | None:
    """Continuous actions' range: the flags', else the data's per column."""
    if transitions.discrete:
        return None
    actions = np.asarray(transitions.action, np.float32)
    dim = transitions.action_dim
    low = actions.min(0) if request.action_low is None else _per_dim(request.action_low, dim,
                                                                    "action_low")
    high = actions.max(0) if request.action_high is None else _per_dim(request.action_high, dim,
                                                                      "action_high")
    if not np.all(low < high):
        raise UserError(f"--action_low / --action_high: need low < high in every dimension; got "
                        f"{np.round(low, 6).tolist()} and {np.round(high, 6).tolist()}")
    return decisions.ActionBox(jnp.asarray(low), jnp.asarray(high))


def _per_dim(values, dim: int, flag: str) -> np.ndarray:
    values = np.asarray(values, np.float32)
    if values.size == 1:
        return np.full(dim, values.item(), np.float32)
    if values.shape != (dim,):
        raise UserError(f"--{flag}: one value or {dim} (one per action dimension); got "
                        f"{values.size}")
    return values


def decision_planner(config: RunConfig, env, transitions, reward: Reward,
                     box: decisions.ActionBox | None):
    """The planner of the decisions: the env's (as `experiments.run --env`)
    or, without an env, random shooting / CEM at the run's planner settings,
    continuous actions in the box [−1, 1]^A (`ActionBox`)."""
    reward_fn = decisions.per_transition(reward.reward, 3)
    terminated_fn = (None if reward.terminated is None
                     else decisions.per_transition(reward.terminated, 1))
    if box is not None:
        reward_fn = box.reward(reward_fn)
    try:
        if env is not None:
            planner_config = config.planner_config(env)
        elif transitions.discrete:
            planner_config = planning.RandomShootingConfig(
                num_actions=transitions.num_actions, **config.planner_fields(True))
        else:
            planner_config = planning.CEMConfig(action_dim=transitions.action_dim,
                                                **config.planner_fields(False))
        factory = next(f for t, f in planning.PLANNERS.items() if isinstance(planner_config, t))
        return factory(planner_config, reward_fn, terminated_fn), reward_fn, terminated_fn
    except ValueError as error:
        raise UserError(f"planner settings: {error}") from None


def chosen_agents(request: DecisionRequest, transitions) -> np.ndarray:
    """(K,) indices of the agents to decide for: --decision_agents' ids
    looked up as `Simulator.agent_index` does (the file's ids; an id read as a
    number also matches its text), or every agent."""
    if request.agents is None:
        return np.arange(transitions.num_agents)
    keys = [str(k) for k in (transitions.agent_keys or range(transitions.num_agents))]
    unknown = [a for a in request.agents if str(a) not in keys]
    if unknown:
        shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
        raise UserError(f"--decision_agents: {unknown[0]!r} is not one of the file's "
                        f"{len(keys)} agent ids ({shown})")
    return np.asarray([keys.index(str(a)) for a in request.agents], np.int32)


def start_states(transitions, agents, horizon: int, count: int):
    """(starts (K, S, D), logged actions (K, S, H[, A]), last states (K, D)):
    S evenly spaced logged states of each agent with H logged steps after
    them, and each agent's last logged state (its last next_obs)."""
    agent_id = np.asarray(transitions.agent_id)
    obs, action = np.asarray(transitions.obs), np.asarray(transitions.action)
    next_obs = np.asarray(transitions.next_obs)
    starts, logged, last = [], [], []
    for agent in agents:          # host-side indexing of the agents' rows
        rows = np.flatnonzero(agent_id == agent)
        if rows.size < horizon:
            raise UserError(f"--decision_horizon: agent "
                            f"{_key(transitions, agent)} has {rows.size} logged steps, fewer "
                            f"than the horizon {horizon}; lower --decision_horizon")
        first = np.unique(np.linspace(0, rows.size - horizon, count).round().astype(int))
        first = np.resize(first, count)        # short trajectories repeat a start
        starts.append(obs[rows[first]])
        logged.append(np.stack([action[rows[f:f + horizon]] for f in first]))
        last.append(next_obs[rows[-1]])
    return np.stack(starts), np.stack(logged), np.stack(last)


def _key(transitions, agent: int):
    keys = transitions.agent_keys
    return keys[agent] if keys is not None else int(agent)


# ---------------------------------------------------------------------------
# The stage


@dataclasses.dataclass
class Prepared:
    """A decision request checked against the user's data, before any
    training or output: every problem the flags can have is found here."""

    request: DecisionRequest
    terminated: Callable | None
    reward: Callable | None
    policies: dict
    box: decisions.ActionBox | None
    agents: np.ndarray
    starts: np.ndarray
    logged: np.ndarray
    last: np.ndarray


def prepare(request: DecisionRequest, env, everything) -> Prepared:
    """Loads and checks the user's functions, the action range, the agents
    and their start states; UserError names the first problem."""
    terminated = None
    if request.terminated is not None:
        terminated = load_function(request.terminated, "terminated")
        check_terminated(terminated, everything)
    reward = None
    if request.reward is not None:
        reward = load_function(request.reward, "reward")
        check_reward(reward, everything)
    elif env is None and np.all(np.asarray(everything.reward) == 0):
        raise UserError("--decide needs a reward: --reward=FILE.py:FUNCTION, --env, or a "
                        "reward column in the file")
    policies = {}
    for spec in request.policies:
        function = load_function(spec, "policies")
        check_policy(function, spec, everything)
        name = spec.rsplit(":", 1)[1]
        policies[spec if name in policies or name in BUILT_IN else name] = function
    box = action_box(request, everything)
    agents = chosen_agents(request, everything)
    starts, logged, last = start_states(everything, agents, request.horizon, request.starts)
    return Prepared(request, terminated, reward, policies, box, agents, starts, logged, last)


def resolve_reward(prepared: Prepared, env, training, held_out, seed: int) -> Reward:
    """The user's reward, the env's, or a reward model (see the module)."""
    terminated = prepared.terminated
    if terminated is None and env is not None:
        terminated = env.terminated
    if prepared.reward is not None:
        return Reward(prepared.reward, terminated,
                      {"source": "function", "spec": prepared.request.reward})
    if env is not None:
        return Reward(env.reward, terminated, {"source": "env", "env": env.name})
    say("[decide] no --reward: fitting a reward model on the file's reward column")
    model, error = fit_reward_model(training, jax.random.PRNGKey(seed), held_out=held_out)
    say(f"[decide] reward model: held-out RMSE {error['rmse']:.4g} (predicting the mean: "
        f"{error['constant_rmse']:.4g}), R² {error['r2']}")
    return Reward(model, terminated, {"source": "model", "held_out": error})


def decide(prepared: Prepared, config: RunConfig, env, everything, training, held_out,
           simulator, population, seed: int) -> dict:
    """results.json's "decisions" (per agent) and "decision_summary".

    Args:
      prepared: the checked request (`prepare`).
      everything: all the user's transitions (start and last states);
      training / held_out: the models' training transitions and the
        held-out ones (the reward model's error);
      simulator: PerSim's trained `Simulator`; population: the population
        model's (one agent).
    """
    start = time.time()
    request, box, agents = prepared.request, prepared.box, prepared.agents
    reward = resolve_reward(prepared, env, training, held_out, seed)
    planner, reward_fn, terminated_fn = decision_planner(config, env, everything, reward, box)
    env_kwargs = dict(terminated_fn=reward.terminated, max_steps=request.horizon)
    if box is not None:
        env_kwargs.update(action_low=box.low, action_high=box.high)
    initial, owners = logged_initial_states(everything)
    persim_env = SimulatorEnv(simulator, reward.reward, initial, initial_agents=owners,
                              **env_kwargs)
    population_env = SimulatorEnv(population, reward.reward, initial[:1],
                                  initial_agents=np.zeros(1, np.int32), **env_kwargs)
    say(f"[decide] {len(agents)} agents: plans from their last states; "
        f"{len(BUILT_IN) + len(prepared.policies)} policies valued over {request.horizon} steps "
        f"from {request.starts} logged states, {simulator.ensemble_size} members")
    key = jax.random.PRNGKey(seed)
    recommendation = decisions.recommend(jax.random.fold_in(key, 0), planner, simulator, agents,
                                         prepared.last, reward_fn, terminated_fn, box=box)
    actors = {"logged": lambda agent, actions: decisions.LoggedActor(actions),
              "mpc": lambda agent, actions: decisions.planner_actor(planner, simulator, agent,
                                                                     box)}
    for name, function in prepared.policies.items():
        actors[name] = lambda agent, actions, function=function: PolicyActor(function)
    values = {}
    for i, (name, actor_for) in enumerate(actors.items()):
        value_key = jax.random.fold_in(key, i + 1)
        mine = decisions.policy_values(value_key, persim_env, actor_for, agents,
                                       prepared.starts, request.horizon, logged=prepared.logged)
        pooled = decisions.policy_values(value_key, population_env, actor_for, agents,
                                         prepared.starts, request.horizon,
                                         logged=prepared.logged,
                                         env_agents=np.zeros_like(agents))
        values[name] = (np.asarray(mine).mean(axis=1), np.asarray(pooled).mean(axis=(1, 2)))
    per_agent = _per_agent(everything, agents, recommendation, values)
    summary = _summary(request, reward, per_agent, list(actors), time.time() - start)
    say(f"[decide] {summary['statement']} ({summary['seconds']:.0f} s)")
    return {"decisions": per_agent, "decision_summary": summary}


def _per_agent(transitions, agents, recommendation, values) -> dict:
    rows = {}
    for k, agent in enumerate(agents):
        member_values = {name: persim[k] for name, (persim, _) in values.items()}
        rank = decisions.ranking(member_values)
        rows[str(_key(transitions, agent))] = {
            "recommended_action": data.jsonable(np.asarray(recommendation.action[k]).tolist()),
            "recommended_plan": data.jsonable(np.asarray(recommendation.sequence[k]).tolist()),
            "plan_return": decisions.summarize(recommendation.member_returns[k]),
            "policies": {name: {**decisions.summarize(persim[k]),
                                "population": float(pooled[k])}
                         for name, (persim, pooled) in values.items()},
            "best": rank["best"], "tied": rank["tied"], "order": rank["order"],
            "agreement": rank["agreement"],
        }
    return rows


def _summary(request, reward: Reward, per_agent: dict, names, seconds: float) -> dict:
    first = {name: sum(row["best"] == name for row in per_agent.values()) for name in names}
    ties = sum(row["best"] is None for row in per_agent.values())
    means = {name: float(np.mean([row["policies"][name]["mean"] for row in per_agent.values()]))
             for name in names}
    population = {name: float(np.mean([row["policies"][name]["population"]
                                        for row in per_agent.values()])) for name in names}
    agreement = float(np.mean([row["agreement"] for row in per_agent.values()]))
    parts = [f"{name!r} first for {count}"
             for name, count in sorted(first.items(), key=lambda item: -item[1]) if count]
    tied_rows = [row["tied"] for row in per_agent.values() if row["best"] is None]
    if tied_rows:
        parts.append(f"a tie for first for {len(tied_rows)} (e.g. "
                     f"{', '.join(map(repr, tied_rows[0]))})")
    statement = (f"Over {len(per_agent)} agents' simulators: {'; '.join(parts)}; each "
                 f"simulator's members agree with its first choice {agreement:.0%} of the time "
                 f"on average")
    return {"horizon": request.horizon, "starts": request.starts, "reward": reward.source,
            "policies": list(names), "ranked_first": first, "ties": ties, "mean_value": means,
            "population_value": population, "mean_agreement": agreement,
            "statement": statement, "seconds": round(seconds, 2)}


# ---------------------------------------------------------------------------
# report.md


def report_lines(results: dict) -> list[str]:
    """The "Decisions" section of report.md (none without decisions)."""
    rows, summary = results.get("decisions"), results.get("decision_summary")
    if not rows or not summary:
        return []
    names = summary["policies"]
    source = summary["reward"]
    reward = {"function": f"your function `{source.get('spec')}`",
              "env": f"{source.get('env')}'s own reward",
              "model": "a reward model fitted on the file's reward column"}[source["source"]]
    lines = ["## Decisions", "",
             f"Reward: {reward}.", ""]
    if source["source"] == "model":
        error = source["held_out"]
        lines += [f"Reward model, held-out last 20 % of each trajectory ({error['transitions']} "
                  f"transitions): RMSE {error['rmse']:.4g} against {error['constant_rmse']:.4g} "
                  f"predicting the training mean (R² {error['r2']:.3f}).", ""]
    lines += [f"Each policy's value: its return over {summary['horizon']} steps on the agent's "
              f"simulator, the mean over {summary['starts']} of the agent's logged states; "
              "mean [min, max] over the ensemble's members, and the population model's value "
              "(the mean over its members). *Agree*: the share of members whose own values put "
              "the same policy first.", "",
              f"**{summary['statement']}.**", "",
              "| agent | recommended action | best | agree | "
              + " | ".join(names) + " |",
              "|---|---|---|---|" + "---|" * len(names)]
    for agent, row in list(rows.items())[:REPORT_AGENTS]:
        cells = [f"{row['policies'][n]['mean']:.2f} [{row['policies'][n]['min']:.2f}, "
                 f"{row['policies'][n]['max']:.2f}]; pop. {row['policies'][n]['population']:.2f}"
                 for n in names]
        action = row["recommended_action"]
        action = (f"{action}" if not isinstance(action, list)
                  else "[" + ", ".join(f"{a:.3g}" for a in action) + "]")
        best = row["best"] or "tie: " + ", ".join(row["tied"])
        lines.append(f"| {agent} | {action} | {best} | {row['agreement']:.0%} | "
                     + " | ".join(cells) + " |")
    if len(rows) > REPORT_AGENTS:
        lines.append(f"| ... {len(rows) - REPORT_AGENTS} more in results.json | | | |"
                     + " |" * len(names))
    lines += ["", "Over all agents: " + "; ".join(
        f"{n}: mean {summary['mean_value'][n]:.2f} (population {summary['population_value'][n]:.2f}),"
        f" first for {summary['ranked_first'][n]}" for n in names) + ".", ""]
    return lines
