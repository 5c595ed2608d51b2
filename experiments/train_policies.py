"""Trains the pure logging policies and the test policy of one env, in one
vmapped run, and writes them as small checkpoints.

    python -m experiments.train_policies --env=cartpole
    python -m experiments.train_policies --env=mountaincar --out_dir=/tmp/policies
    python -m experiments.train_policies --env=halfcheetah --num_timesteps=200000

Policy k of the pure set is trained on `env.policy_training_agents[k]` (Table 1);
the test policy on `env.default_agent`. All K + 1 are one vmapped program
(DQN for discrete actions: MountainCar, CartPole; TD3 for continuous ones:
HalfCheetah), with the env's budget from `experiments.paper.POLICY_TRAINING`.
The best evaluated params of each agent are kept, re-evaluated on more
episodes at the end, and written to `<out_dir>/<env>_pure_<k>.msgpack`,
`<out_dir>/<env>_test.msgpack`, with `<out_dir>/<env>.json` holding the
returns reached and the budget.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from tqdm import tqdm

import envs
from experiments import paper
from experiments.datagen import policies

FLAGS = flags.FLAGS
flags.DEFINE_enum("env", None, list(envs.ENV_NAMES), "Environment.")
flags.DEFINE_string("out_dir", policies.DEFAULT_POLICY_DIR, "Where the checkpoints go.")
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.DEFINE_integer("num_timesteps", None, "Env steps per env copy (default: the env's budget).")
flags.DEFINE_integer("final_episodes", None,
                     "Episodes per policy of the final evaluation (default: the env's budget, "
                     "50; HalfCheetah 5).")
flags.DEFINE_string("config", None, "JSON dict of trainer keyword arguments overriding the "
                    "env's budget (experiments.paper.POLICY_TRAINING).")
flags.DEFINE_string("state_path", None,
                    "TD3 (continuous actions): where the training state (actors, critics) is "
                    "checkpointed after each improvement (default: "
                    "runs/<env>_td3_state.msgpack).")
flags.DEFINE_string("resume", None, "TD3 (continuous actions): a training-state checkpoint to "
                    "start from.")
flags.DEFINE_list("only", None, "Retrain only these of the K + 1 policies (indices; K = the "
                  "test policy), keeping the others; each replaces its shipped checkpoint only "
                  "if it evaluates better (TD3: from --resume).")


def training_agents(env) -> np.ndarray:
    """(K + 1, P): the policy-training agents, then the default agent (test policy)."""
    return np.concatenate([env.policy_training_agents, env.default_agent[None]], axis=0)


def trainer_config(env_name: str, num_timesteps: int | None = None,
                   config: dict | None = None) -> tuple[dict, int]:
    """(trainer keyword arguments, final-evaluation episodes): the env's entry
    of `paper.POLICY_TRAINING`, overridden by `config`, then `num_timesteps`."""
    config = {**paper.POLICY_TRAINING[env_name], **(config or {})}
    final_episodes = int(config.pop("final_episodes"))
    if num_timesteps is not None:
        config["num_timesteps"] = int(num_timesteps)
    return config, final_episodes


def _progress(env_name: str, num_timesteps: int, enabled: bool):
    """(tqdm bar, progress_fn for the trainers): the bar follows the steps,
    each evaluation's metrics are printed as one JSON line."""
    bar = tqdm(total=num_timesteps, desc=f"{env_name} policies", disable=not enabled, unit="step")

    def progress_fn(step, metrics):
        bar.update(step - bar.n)
        bar.set_postfix_str("returns " + " ".join(f"{r:.0f}" for r in metrics["returns"]))
        tqdm.write(json.dumps({"step": step, **{k: v for k, v in metrics.items() if k != "step"}}))

    return bar, progress_fn


def _shipped(env, out_dir) -> policies.Params:
    """(K + 1) stacked policies now in out_dir: the K pure ones, then the test one."""
    k = len(env.policy_training_agents)
    return policies.stack([*[policies.unstack(policies.load_pure_policies(env, out_dir), i)
                             for i in range(k)], policies.load_test_policy(env, out_dir)])


def _train_dqn(env, covariates, key, indices, *, only, out_dir, seed, final_episodes, config,
               progress_fn):
    """DQN on `covariates` (rows `indices` of `training_agents`). Returns
    ((K + 1) stacked params when all are trained, else the shipped ones with
    the better retrained rows; the history)."""
    from experiments.datagen import dqn

    params, _, history = dqn.train(env, covariates, key=key, progress_fn=progress_fn, **config)
    if only:
        params = _keep_better(env, _shipped(env, out_dir), params, indices, covariates,
                              jax.random.PRNGKey(seed + 3), final_episodes)
    return params, history


def _td3_checkpoint_fn(env, merge, indices, returns_so_far, *, out_dir, state_path):
    """The TD3 trainer's checkpoint_fn: writes the (merged) best actors as the
    shipped policies, the training state to `state_path` and the best returns
    so far to `<out_dir>/<env>.json`."""
    k = len(env.policy_training_agents)

    def checkpoint_fn(best_actors, best_returns, state):
        merged = merge(best_actors)
        policies.save_policies(env, "pure", policies.stack(
            [policies.unstack(merged, i) for i in range(k)]), directory=out_dir)
        policies.save_policies(env, "test", policies.unstack(merged, k), directory=out_dir)
        policies.save_params(state_path, state)
        for row, value in zip(indices, best_returns.tolist()):
            returns_so_far[row] = value
        policies.save_policy_info(env.name, {"best_eval_returns_so_far": returns_so_far},
                                  out_dir)

    return checkpoint_fn


def _train_td3(env, covariates, key, indices, *, only, out_dir, previous, state_path, resume,
               config, progress_fn):
    """TD3 on `covariates` (rows `indices` of `training_agents`), checkpointing
    each improvement; `resume` starts from a saved training state, `only`
    from the shipped actors' returns. Returns ((K + 1) stacked actors, the
    history)."""
    from experiments.datagen import td3

    k = len(env.policy_training_agents)
    suffix = "" if not only else "_" + "_".join(map(str, indices))
    state_path = state_path or os.path.join("runs", f"{env.name}_td3_state{suffix}.msgpack")

    def merge(actors):
        if not only:
            return actors
        rows = jnp.asarray(indices)
        return jax.tree.map(lambda full, sub: full.at[rows].set(sub), _shipped(env, out_dir),
                            actors)

    returns_so_far = list(previous.get("best_eval_returns_so_far") or [None] * (k + 1))
    init_state = init_best = None
    if resume:
        init_state = policies.load_params(resume)
        width = {int(np.shape(x)[0]) for x in jax.tree.leaves(init_state)}
        if only and width == {k + 1}:
            init_state = jax.tree.map(lambda x: x[jnp.asarray(indices)], init_state)
    if only:
        init_best = (jax.tree.map(lambda x: x[jnp.asarray(indices)], _shipped(env, out_dir)),
                     [returns_so_far[i] for i in indices])
    checkpoint_fn = _td3_checkpoint_fn(env, merge, indices, returns_so_far, out_dir=out_dir,
                                       state_path=state_path)
    params, _, history = td3.train(env, covariates, key=key, progress_fn=progress_fn,
                                   checkpoint_fn=checkpoint_fn, init_state=init_state,
                                   init_best=init_best, **config)
    return merge(params), history


def _final_evaluation(env, params, seed: int, final_episodes: int, selection_epsilon: float):
    """((K + 1, final_episodes) greedy returns, the same at the selection ε
    or None when it is 0) of the K + 1 policies on their own agents."""
    covariates = training_agents(env)
    returns = policies.evaluate(env, params, covariates, jax.random.PRNGKey(seed + 1),
                                num_episodes=final_episodes)
    noisy = (policies.evaluate(env, params, covariates, jax.random.PRNGKey(seed + 2),
                               num_episodes=final_episodes, epsilon=selection_epsilon)
             if selection_epsilon else None)
    return returns, noisy


def _save(env, params, out_dir) -> None:
    """Writes the K pure policies and the test policy of a (K + 1) stack."""
    k = len(env.policy_training_agents)
    policies.save_policies(env, "pure", policies.stack([policies.unstack(params, i)
                                                        for i in range(k)]), directory=out_dir)
    policies.save_policies(env, "test", policies.unstack(params, k), directory=out_dir)


def _summary(env, *, returns, noisy, selection_epsilon, config, seed, final_episodes,
             train_s, previous, indices, history, resume) -> dict:
    """The record written to `<out_dir>/<env>.json`: agents, returns reached,
    budget, floors and targets, every training run and this run's history."""
    k = len(env.policy_training_agents)
    earlier_runs = previous.get("train_runs", [
        {"agents": list(range(k + 1)), "seconds": previous.get("train_seconds"),
         "steps": (previous.get("history") or [{}])[-1].get("step")}] if previous else [])
    return {
        "env": env.name,
        "algorithm": "double DQN" if env.discrete_actions else "TD3",
        "config": {key: value for key, value in config.items()},
        "seed": seed,
        "pure": {
            "agents": env.policy_training_agents.tolist(),
            "mean_return": returns[:k].mean(axis=1).tolist(),
            "min_return": returns[:k].min(axis=1).tolist(),
            "mean_return_at_selection_epsilon": (None if noisy is None else
                                                 noisy[:k].mean(axis=1).tolist()),
        },
        "test": {
            "agent": env.default_agent.tolist(),
            "mean_return": float(returns[k].mean()),
            "min_return": float(returns[k].min()),
            "mean_return_at_selection_epsilon": None if noisy is None else float(noisy[k].mean()),
        },
        "selection_epsilon": selection_epsilon,
        "final_episodes": final_episodes,
        "return_floors": paper.POLICY_RETURN_FLOORS[env.name],
        "paper_targets": paper.POLICY_TARGETS[env.name],
        "train_seconds": round(train_s, 1),
        "train_runs": earlier_runs + [
            {"agents": indices, "seed": seed, "seconds": round(train_s, 1),
             "steps": history[-1]["step"] if history else 0, "resumed_from": resume}],
        "history": [{"step": h["step"], "elapsed_s": round(h["elapsed_s"], 1),
                     "returns": [round(r, 1) for r in h["returns"]]} for h in history],
        "machine": "2 CPU cores (JAX on CPU)" if jax.default_backend() == "cpu"
                   else f"{jax.default_backend()}: {jax.devices()[0].device_kind}",
    }


def train_env(env_name: str, *, out_dir: str, seed: int = 0, num_timesteps: int | None = None,
              final_episodes: int | None = None, config: dict | None = None,
              state_path: str | None = None, resume: str | None = None,
              only: list[int] | None = None, progress: bool = True) -> dict:
    """Trains, evaluates and saves the K pure policies and the test policy of
    `env_name`. Returns the summary written to `<out_dir>/<env>.json`.

    `final_episodes` defaults to the env's budget (`paper.POLICY_TRAINING`).
    TD3 (continuous actions) writes the best actors to `out_dir` and the
    training state to `state_path` whenever an agent improves, so that an
    interrupted run keeps its progress (`resume` starts from such a state).
    `only` (indices into `training_agents(env)`, K = the test policy)
    retrains a subset of them from `resume`, each replacing its shipped
    checkpoint only when it evaluates better; the others are kept as they are."""
    env = envs.make(env_name)
    k = len(env.policy_training_agents)
    indices = list(range(k + 1)) if not only else sorted({int(i) for i in only})
    if not all(0 <= i <= k for i in indices):
        raise ValueError(f"--only takes indices in 0..{k} (K = {k} is the test policy); got {only}")
    covariates = training_agents(env)[indices]
    previous = policies.load_policy_info(env_name, out_dir) if only else {}
    config, budget_episodes = trainer_config(env_name, num_timesteps, config)
    final_episodes = budget_episodes if final_episodes is None else int(final_episodes)
    bar, progress_fn = _progress(env_name, config["num_timesteps"], progress)
    start = time.time()
    key = jax.random.PRNGKey(seed)
    if env.discrete_actions:
        params, history = _train_dqn(env, covariates, key, indices, only=only, out_dir=out_dir,
                                     seed=seed, final_episodes=final_episodes, config=config,
                                     progress_fn=progress_fn)
    else:
        params, history = _train_td3(env, covariates, key, indices, only=only, out_dir=out_dir,
                                     previous=previous, state_path=state_path, resume=resume,
                                     config=config, progress_fn=progress_fn)
    bar.close()
    train_s = time.time() - start
    selection_epsilon = float(config.get("eval_epsilon", 0.0))
    returns, noisy = _final_evaluation(env, params, seed, final_episodes, selection_epsilon)
    _save(env, params, out_dir)
    summary = _summary(env, returns=returns, noisy=noisy, selection_epsilon=selection_epsilon,
                       config=config, seed=seed, final_episodes=final_episodes, train_s=train_s,
                       previous=previous, indices=indices, history=history, resume=resume)
    policies.save_policy_info(env_name, summary, out_dir)
    return summary


def _keep_better(env, shipped, trained, indices, covariates, key, num_episodes: int):
    """The (K + 1) shipped policies with row indices[j] replaced by trained[j]
    where that one has the higher greedy mean return on its own agent."""
    new = policies.evaluate(env, trained, covariates, key, num_episodes=num_episodes).mean(axis=1)
    rows = jnp.asarray(indices)
    old_params = jax.tree.map(lambda x: x[rows], shipped)
    old = policies.evaluate(env, old_params, covariates, key, num_episodes=num_episodes).mean(axis=1)
    result = shipped
    for j, row in enumerate(indices):
        better = bool(new[j] > old[j])
        print(f"  policy {row}: retrained {new[j]:.1f} vs shipped {old[j]:.1f} -> "
              f"{'retrained' if better else 'shipped'} kept", flush=True)
        if better:
            result = jax.tree.map(lambda full, sub: full.at[row].set(sub[j]), result, trained)
    return result


def main(argv):
    del argv
    summary = train_env(FLAGS.env, out_dir=FLAGS.out_dir, seed=FLAGS.seed,
                        num_timesteps=FLAGS.num_timesteps, final_episodes=FLAGS.final_episodes,
                        config=json.loads(FLAGS.config) if FLAGS.config else None,
                        state_path=FLAGS.state_path, resume=FLAGS.resume,
                        only=[int(i) for i in FLAGS.only] if FLAGS.only else None)
    floors = summary["return_floors"]
    print(f"{summary['env']}: trained in {summary['train_seconds']:.0f} s")
    for i, (agent, ret) in enumerate(zip(summary["pure"]["agents"], summary["pure"]["mean_return"])):
        flag = "ok" if ret >= floors["pure"] else f"BELOW the floor {floors['pure']:g}"
        print(f"  pure {i} on agent {agent}: mean return {ret:.1f} ({flag})")
    ret = summary["test"]["mean_return"]
    flag = "ok" if ret >= floors["test"] else f"BELOW the floor {floors['test']:g}"
    print(f"  test on agent {summary['test']['agent']}: mean return {ret:.1f} ({flag})")


if __name__ == "__main__":
    flags.mark_flag_as_required("env")
    app.run(main)
