"""New agents without retraining: how well a trained PerSim simulator serves
agents it never saw, from K of their transitions, in closed form.

    python -m experiments.new_agents --env=mountaincar --dataset=random          # quick
    python -m experiments.new_agents --env=cartpole --dataset=pure --preset=paper

The simulator is `experiments.run`'s (trained, or reused from
`<out_dir>/<env>/<dataset>/` when that run's settings match). Then:

  1. N unseen agents are drawn uniformly from the env's ranges (none of the
     dataset's) and each logs one trajectory with the dataset's logging
     policy (`datagen.datasets.collect`);
  2. for K in 5, 10, 20, 50, 100 and the whole trajectory, their factors are
     fitted from their first K transitions (`Simulator.add_agents`) and the
     paper's open-loop prediction error (RMSE) is measured on them;
  3. references on the same agents and episodes: PerSim retrained with their
     whole trajectories in the training data (`rmse_retrained`), and the
     population model (`methods.Population`: one simulator for everyone,
     `rmse_population`), both trained with the run's settings;
  4. MPC reward of the first `--mpc_agents` new agents planned on their
     closed-form simulators at the largest K, beside the retrained simulator
     and the true physics.

Writes `<out_dir>/<env>/<dataset>/new_agents.json`, `new_agents.png` (RMSE vs
K) and `new_agents.md` (a report section); the retrained simulator and its
stage records go to `<out_dir>/<env>/<dataset>/new_agents/`.
"""

from __future__ import annotations

import json
import os
import sys
import time
import zlib

if __name__ == "__main__":
    # One JAX CPU device per core, before envs (gymnax) starts JAX's backends.
    from persim_jax import runtime
    runtime.use_cpu_cores()

import jax
import numpy as np
from absl import app, flags, logging

import envs
from experiments import cli, figures, paper, pipeline
from experiments import config as config_lib
from experiments.cache import RunDirectory, digest, say
from experiments.stages import planner_description, planner_for, test_agents_of, train_stage
from experiments.config import UserError
from experiments.datagen import datasets, policies
from persim_jax import data, evaluation, methods

FLAGS = flags.FLAGS

# Transitions per new agent; None: the whole logged trajectory.
TRANSITIONS_PER_AGENT = (5, 10, 20, 50, 100, None)
NEW_AGENTS_KEY_OFFSET = 5000


def define_flags() -> None:
    """This CLI's flags (defined only when it runs as a program)."""
    flags.DEFINE_enum("env", None, list(envs.ENV_NAMES), "Environment.")
    flags.DEFINE_enum("dataset", "pure", list(datasets.DATASETS),
                      "The paper's dataset the simulator is trained on; the new agents log "
                      "with its logging policy.")
    flags.DEFINE_enum("preset", "quick", ["quick", "paper"], "As experiments.run's.")
    flags.DEFINE_integer("seed", 0, "Seed of the dataset, training and evaluation (as "
                         "experiments.run's; trial 0's simulator is used).")
    flags.DEFINE_string("out_dir", "runs", "Results go to <out_dir>/<env>/<dataset>/.")
    flags.DEFINE_string("data_dir", datasets.DEFAULT_DATA_DIR, "Dataset cache.")
    flags.DEFINE_integer("num_new_agents", 20, "Unseen agents drawn from the env's ranges.")
    flags.DEFINE_integer("mpc_agents", 5, "New agents whose MPC reward is measured (0: none).")
    flags.DEFINE_bool("force", False, "Retrain instead of reusing stored simulators.")
    # The run's training and planner settings, as experiments.run's (a
    # simulator trained by a run with the same settings is reused).
    cli.define_training_flags()
    cli.define_planner_flags()


# ---------------------------------------------------------------------------
# The new agents


def sample_new_agents(env, key: jax.Array, count: int, existing: np.ndarray) -> np.ndarray:
    """(count, P) covariates uniform in the env's ranges, none equal to a row
    of `existing` (N, P) (the dataset's agents)."""
    low, high = (np.asarray(x, np.float64) for x in zip(*env.covariate_ranges))
    fresh = np.asarray(jax.random.uniform(key, (count, len(low)), minval=low, maxval=high))
    if existing is not None and len(existing):
        taken = np.any(np.all(np.isclose(fresh[:, None, :], np.asarray(existing)[None], rtol=0,
                                         atol=1e-9 * (high - low)), axis=-1), axis=1)
        if taken.any():
            raise UserError(f"new agents: {int(taken.sum())} drawn agent(s) equal dataset "
                            f"agents; change --seed")
    return fresh.astype(np.float32)


def log_new_agents(env, dataset: str, covariates: np.ndarray, key: jax.Array
                   ) -> data.Transitions:
    """One trajectory per agent with `dataset`'s logging policy (the pure
    policies, ε-mixed, or random actions), until termination or the cap."""
    epsilon = datasets.EPSILON[dataset]
    pure = None if epsilon >= 1.0 else policies.load_pure_policies(env)
    rollout = datasets.collect(env, covariates, key, epsilon=epsilon, pure_params=pure)
    return data.from_rollouts(
        rollout["obs"], rollout["action"], rollout["next_obs"], reward=rollout["reward"],
        done=rollout["terminated"], timeout=rollout["truncated"], valid=rollout["valid"],
        num_actions=env.num_actions if env.discrete_actions else None, covariates=covariates)


def first_transitions(transitions: data.Transitions, count: int | None) -> data.Transitions:
    """Each agent's first `count` transitions in logged order (all if None or
    if its trajectory is shorter)."""
    if count is None:
        return transitions
    ids = np.asarray(transitions.agent_id)
    order = np.argsort(ids, kind="stable")
    position = np.empty_like(ids)
    starts = np.searchsorted(ids[order], ids[order])          # first row of each agent
    position[order] = np.arange(len(ids)) - starts
    return transitions.select(position < count)


def with_new_agents(transitions: data.Transitions, new: data.Transitions) -> data.Transitions:
    """The dataset with the new agents appended as agents N..N+K-1 (the
    retrained reference's training data)."""
    n = transitions.num_agents
    join = lambda a, b: np.concatenate([np.asarray(a), np.asarray(b)])
    covariates = (None if transitions.covariates is None or new.covariates is None
                  else join(transitions.covariates, new.covariates))
    return transitions.replace(
        obs=join(transitions.obs, new.obs), action=join(transitions.action, new.action),
        next_obs=join(transitions.next_obs, new.next_obs),
        reward=join(transitions.reward, new.reward), done=join(transitions.done, new.done),
        timeout=join(transitions.timeout, new.timeout),
        agent_id=join(transitions.agent_id, np.asarray(new.agent_id) + n),
        covariates=covariates, num_agents=n + new.num_agents, agent_keys=None)


# ---------------------------------------------------------------------------
# The experiment


def _prediction(key, model, env, covariates, agent_ids, episodes: int) -> list[float]:
    """Per-agent mean open-loop RMSE (the paper's protocol, the test policy)."""
    errors = evaluation.prediction_error(key, model, env, policies.test_policy(env), covariates,
                                         agent_ids, num_episodes=episodes,
                                         warmup=paper.PREDICTION_WARMUP,
                                         horizon=paper.PREDICTION_HORIZON)
    return errors.summary()["rmse"]


def _reward(key, planner, dynamics_for_agent, env, covariates, episodes, max_steps) -> dict:
    returns = evaluation.run_episodes(key, planner, dynamics_for_agent, env, covariates, episodes,
                                      max_steps=max_steps)
    per_agent = returns.mean(axis=1)
    return {"mean": float(per_agent.mean()), "per_agent": [float(x) for x in per_agent],
            "std_over_episodes": [float(x) for x in returns.std(axis=1)]}


def _numbers(values) -> list:
    """Floats for JSON, None where not finite (an agent whose predictions
    diverged)."""
    return [float(x) if np.isfinite(x) else None for x in np.asarray(values, np.float64)]


def _mean(values) -> float | None:
    """Mean over agents, None if any agent's value is not finite."""
    values = np.asarray(values, np.float64)
    return float(values.mean()) if np.all(np.isfinite(values)) else None


def _key(name: str, seed: int) -> jax.Array:
    base = jax.random.PRNGKey(seed + NEW_AGENTS_KEY_OFFSET)
    return jax.random.fold_in(base, zlib.crc32(name.encode()))


def _train_references(the_run, config, transitions, metadata, test_ids, seed):
    """(PerSim's simulator, the population model, PerSim's method): trial 0
    of each, with the keys `experiments.run` gives them, so that its stored
    simulators are reused (and ours are reused by it)."""
    dataset_key = pipeline.dataset_identity(metadata)
    persim = methods.PerSim(config.training())
    population = methods.Population(config.training())
    [simulator], _ = train_stage(the_run, persim, transitions, 1, seed, digest(dataset_key),
                                 test_ids)
    [pooled], _ = train_stage(the_run, population, transitions, 1, seed, digest(dataset_key),
                              test_ids)
    return simulator, pooled, persim


def _predictions(env, simulator, retrained, pooled, new, covariates, transitions_per_agent,
                 episodes, seed):
    """({K: simulator with the new agents' factors from K transitions},
    per-K RMSE (len(K), agents), retrained RMSE, population RMSE)."""
    num_new_agents = len(covariates)
    new_ids = simulator.num_agents + np.arange(num_new_agents)
    prediction_key = _key("prediction", seed)
    say(f"[prediction] {num_new_agents} new agents × {episodes} episodes, K in "
        f"{[k or 'all' for k in transitions_per_agent]}")
    per_k, simulators = [], {}
    for count in transitions_per_agent:
        fitted = simulator.add_agents(first_transitions(new, count))
        simulators[count] = fitted
        per_k.append(_prediction(prediction_key, fitted, env, covariates, new_ids, episodes))
        say(f"[prediction] K = {count or 'all'}: mean RMSE {_mean(per_k[-1])}")
    retrained_rmse = _prediction(prediction_key, retrained, env, covariates, new_ids, episodes)
    population_rmse = _prediction(prediction_key, pooled, env, covariates,
                                  np.zeros(num_new_agents, np.int64), episodes)
    say(f"[prediction] references: retrained {_mean(retrained_rmse)}, population "
        f"{_mean(population_rmse)}")
    return simulators, np.asarray(per_k), retrained_rmse, population_rmse


def _rewards(env, config, simulator, retrained, covariates, mpc_agents, largest, seed) -> dict:
    """MPC reward of the first `mpc_agents` new agents: closed-form factors
    from `largest` transitions (`simulator`), retrained, true physics."""
    planner = planner_for(env, config)
    new_ids = (retrained.num_agents - len(covariates) + np.arange(mpc_agents)).tolist()
    shown = covariates[:mpc_agents]
    key = _key("reward", seed)
    say(f"[reward] MPC of {mpc_agents} new agents × {config.episodes} episodes: closed-form "
        f"factors (K = {largest or 'all'}), retrained, true physics")
    play = lambda dynamics: _reward(key, planner, dynamics, env, shown, config.episodes,
                                    config.max_steps)
    return {
        "transitions_per_agent": largest if largest is not None else "all",
        "agents": mpc_agents, "episodes": config.episodes,
        "max_steps": config.max_steps or env.max_episode_steps,
        "planner": planner_description(planner),
        "new": play(evaluation.simulator_dynamics_for_agent(simulator, new_ids)),
        "retrained": play(evaluation.simulator_dynamics_for_agent(retrained, new_ids)),
        "true_env_mpc": play(evaluation.true_env_dynamics_for_agent(env)),
    }


def run_new_agents(env_name: str, dataset: str, *, preset: str = "quick", seed: int = 0,
                   out_dir: str = "runs", data_dir: str = datasets.DEFAULT_DATA_DIR,
                   num_new_agents: int = 20, mpc_agents: int = 5,
                   transitions_per_agent=TRANSITIONS_PER_AGENT, force: bool = False,
                   overrides: dict | None = None) -> dict:
    """Runs the experiment (module docstring) and returns `new_agents.json`'s
    contents. `overrides`: `RunConfig` fields replacing the preset's."""
    if num_new_agents < 1:
        raise UserError(f"--num_new_agents: must be >= 1; got {num_new_agents}")
    if not 0 <= mpc_agents <= num_new_agents:
        raise UserError(f"--mpc_agents: must be in 0..{num_new_agents}; got {mpc_agents}")
    start, timing = time.time(), {}
    config = config_lib.resolve(env_name, dataset, preset, overrides)
    env = envs.make(env_name)
    transitions, metadata, name, _ = pipeline.dataset_stage(env_name, dataset, config, seed,
                                                            data_dir)
    directory = os.path.join(out_dir, env_name, name)
    os.makedirs(directory, exist_ok=True)
    _, test_ids = test_agents_of(env, transitions)
    train_start = time.time()
    simulator, pooled, persim = _train_references(RunDirectory(directory, force), config,
                                                  transitions, metadata, test_ids, seed)
    timing["train"] = round(time.time() - train_start, 2)

    agents_key, log_key = jax.random.split(_key("agents", seed))
    covariates = sample_new_agents(env, agents_key, num_new_agents,
                                   None if transitions.covariates is None
                                   else np.asarray(transitions.covariates))
    new = log_new_agents(env, dataset, covariates, log_key)
    lengths = new.transitions_per_agent()
    say(f"[new agents] {num_new_agents} unseen agents, one {dataset} trajectory each "
        f"({int(lengths.min())}-{int(lengths.max())} transitions)")

    retrain_start = time.time()
    combined = with_new_agents(transitions, new)
    retrain_key = digest({"dataset": pipeline.dataset_identity(metadata),
                          "new_agents": covariates.tolist(), "log_seed": seed})
    [retrained], _ = train_stage(RunDirectory(os.path.join(directory, "new_agents"), force),
                                 persim, combined, 1, seed, retrain_key, test_ids)
    timing["retrain"] = round(time.time() - retrain_start, 2)

    prediction_start = time.time()
    simulators, rmse_new, retrained_rmse, population_rmse = _predictions(
        env, simulator, retrained, pooled, new, covariates, transitions_per_agent,
        config.prediction_episodes, seed)
    timing["prediction"] = round(time.time() - prediction_start, 2)
    reward = None
    if mpc_agents:
        reward_start = time.time()
        largest = transitions_per_agent[-1]
        reward = _rewards(env, config, simulators[largest], retrained, covariates, mpc_agents,
                          largest, seed)
        timing["reward"] = round(time.time() - reward_start, 2)
    results = _record(env_name, env, dataset, preset, seed, covariates, lengths,
                      transitions_per_agent, rmse_new, retrained_rmse, population_rmse,
                      config.prediction_episodes, reward, simulator, transitions, persim,
                      combined)
    timing["total"] = round(time.time() - start, 2)
    results["timing_s"] = timing
    _write(results, directory)
    return results


def _record(env_name, env, dataset, preset, seed, covariates, lengths, transitions_per_agent,
            rmse_new, retrained_rmse, population_rmse, episodes, reward, simulator, transitions,
            persim, combined) -> dict:
    """new_agents.json's contents (the timings aside)."""
    return {
        "env": env_name, "dataset": dataset, "preset": preset, "seed": seed,
        "num_new_agents": len(covariates),
        "covariate_names": list(env.covariate_names),
        "new_agents": covariates.tolist(),
        "trajectory_lengths": lengths.tolist(),
        "transitions_per_agent": [k if k is not None else "all" for k in transitions_per_agent],
        "rmse_new": [_mean(row) for row in rmse_new],
        "rmse_new_std": _numbers(rmse_new.std(axis=1)),
        "rmse_new_per_agent": [_numbers(row) for row in rmse_new],
        "rmse_retrained": _mean(retrained_rmse),
        "rmse_retrained_per_agent": _numbers(retrained_rmse),
        "rmse_population": _mean(population_rmse),
        "rmse_population_per_agent": _numbers(population_rmse),
        "prediction": {"episodes": episodes, "warmup": paper.PREDICTION_WARMUP,
                       "horizon": paper.PREDICTION_HORIZON,
                       "policy": "the env's test policy (the paper's protocol)"},
        "reward": reward,
        "ridge": [float(x) for x in np.asarray(simulator.validation_loss)],
        "training": {"num_agents": transitions.num_agents,
                     "num_transitions": transitions.num_transitions,
                     "config": persim.description(), "rank": simulator.rank,
                     "retrained_num_agents": combined.num_agents},
        "backend": jax.default_backend(),
    }


def _write(results: dict, directory: str) -> None:
    """new_agents.json, .png and .md in `directory`."""
    data.write_json(os.path.join(directory, "new_agents.json"), results)
    plot_rmse(results, os.path.join(directory, "new_agents.png"))
    write_section(results, os.path.join(directory, "new_agents.md"))
    say(f"[report] {os.path.join(directory, 'new_agents.json')} "
        f"({results['timing_s']['total']:.0f} s)")


# ---------------------------------------------------------------------------
# Figure and report section


def _x_positions(results: dict) -> np.ndarray:
    """K on the x axis; the whole trajectory at its mean length, or right of
    the largest K when the trajectories are shorter on average."""
    counts = [k for k in results["transitions_per_agent"] if k != "all"]
    whole = max(float(np.mean(results["trajectory_lengths"])), 1.5 * max(counts, default=1))
    return np.asarray([whole if k == "all" else k for k in results["transitions_per_agent"]],
                      np.float64)


def plot_rmse(results: dict, path: str) -> str:
    """RMSE of the new agents vs K, the retrained and population models as
    horizontal references (log-log)."""
    fig, ax = figures.plt.subplots(figsize=(5.5, 3.8))
    x = _x_positions(results)
    as_array = lambda values: np.asarray([np.nan if v is None else v for v in values], float)
    new = as_array(results["rmse_new"])
    ax.errorbar(x, new, yerr=as_array(results["rmse_new_std"]), marker="o", capsize=3,
                label="closed-form factor from K transitions")
    # A reference far above the new agents' curve (a diverging open loop) is
    # named in the legend rather than drawn, so that the curve stays readable.
    ceiling = 100 * np.nanmax(new) if np.isfinite(new).any() else np.inf
    for name, style, label in (("rmse_retrained", dict(color="tab:green", linestyle="--"),
                                "retrained with the new agents"),
                               ("rmse_population", dict(color="tab:red", linestyle=":"),
                                "population model (no agent factor)")):
        value = results[name]
        if value is not None and value <= ceiling:
            ax.axhline(value, label=label, **style)
        else:
            ax.plot([], [], label=f"{label}: {_text(value, 2)}, off the chart", **style)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_locator(figures.matplotlib.ticker.NullLocator())
    ax.set_xticks(x)
    ax.set_xticklabels([str(k) for k in results["transitions_per_agent"]])
    ax.set_xlabel("transitions per new agent (K)")
    ax.set_ylabel("open-loop RMSE (10 + 50 steps)")
    title = paper.DISPLAY_NAMES.get(results["env"], results["env"])
    ax.set_title(f"{title} / {results['dataset']}: {results['num_new_agents']} unseen agents")
    ax.legend(fontsize=8, loc="best")
    return figures.save_figure(fig, path)


def _text(value, digits: int = 4) -> str:
    return "diverged" if value is None else f"{value:.{digits}g}"


def render_section(results: dict) -> str:
    """The report section (markdown)."""
    lines = [f"## New agents without retraining ({results['env']} / {results['dataset']}, "
             f"{results['preset']} preset)", "",
             f"{results['num_new_agents']} agents drawn uniformly from the env's ranges (none "
             f"of the dataset's), one {results['dataset']} trajectory each "
             f"({min(results['trajectory_lengths'])}-{max(results['trajectory_lengths'])} "
             f"transitions). Their factors are fitted in closed form from their first K "
             f"transitions (`Simulator.add_agents`); the prediction error is the paper's "
             f"(test policy, {results['prediction']['episodes']} episodes per agent, 10 "
             f"teacher-forced + 50 open-loop steps), mean ± std over the new agents.", "",
             "| K | RMSE (new, closed form) |", "|---|---|"]
    for k, mean, std in zip(results["transitions_per_agent"], results["rmse_new"],
                            results["rmse_new_std"]):
        lines.append(f"| {k} | {_text(mean)} ± {_text(std, 2)} |")
    lines += ["", f"References on the same agents and episodes: retrained with their whole "
              f"trajectories {_text(results['rmse_retrained'])}; population model "
              f"{_text(results['rmse_population'])}.", ""]
    reward = results.get("reward")
    if reward:
        lines += [f"MPC reward of the first {reward['agents']} new agents "
                  f"({reward['episodes']} episodes each, K = {reward['transitions_per_agent']}): "
                  f"closed form {reward['new']['mean']:.1f}, retrained "
                  f"{reward['retrained']['mean']:.1f}, true env + MPC "
                  f"{reward['true_env_mpc']['mean']:.1f}.", ""]
    lines += ["![RMSE vs K](new_agents.png)", ""]
    return "\n".join(lines)


def write_section(results: dict, path: str) -> str:
    with data.atomic_write(path, "w") as handle:
        handle.write(render_section(results))
    return path


def main(argv):
    cli.show_progress()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.env is None:
        print("error: --env is required", file=sys.stderr)
        return 2
    try:
        results = run_new_agents(FLAGS.env, FLAGS.dataset, preset=FLAGS.preset,
                                 seed=FLAGS.seed, out_dir=FLAGS.out_dir,
                                 data_dir=FLAGS.data_dir, num_new_agents=FLAGS.num_new_agents,
                                 mpc_agents=FLAGS.mpc_agents, force=FLAGS.force,
                                 overrides=cli.overrides_from_flags())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(render_section(results))
    print(json.dumps({k: results[k] for k in ("transitions_per_agent", "rmse_new",
                                               "rmse_retrained", "rmse_population")}))
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
