"""Training throughput at the paper's model sizes: the simulators, and the
CaDM and BCQ baselines.

    python -m benchmarks.train_throughput [--settings=cartpole,halfcheetah] [--agents=500]
    python -m benchmarks.train_throughput --baselines=vanilla_cadm,pe_ts_cadm,bcq_p,bcq_a

Prints one JSON line per setting: training transitions per second of one
jitted epoch of `persim_jax.persim.train` (M ensemble members trained together, each
transition counted once for all M members), batch 256, for synthetic data of
the setting's shapes (random states, actions and agent ids: the cost does not
depend on the values). `train_transitions_per_s` times the epoch alone;
`fit_transitions_per_s` also scores a validation set of 25 % of the training
size after the epoch, as `fit` does with a 20 % hold-out.

With `--baselines`, a line per baseline and setting instead: BCQ gradient
steps per second of each policy (`iterations_per_s`) at the paper's batch and
layer sizes, one jitted chunk of `--bcq_chunk` iterations vmapped over the
policies (BCQ-P: 1 policy on every transition; BCQ-A: 5, one per test agent).
CaDM: (context, transition) pairs per second of one jitted epoch of
`--cadm_batches` minibatches of 256 per member (`pairs_per_s` counts each
member's pairs: PE-TS trains 5 members), and what one epoch over every pair
of 500 agents × `--cadm_steps` transitions takes (`epoch_s`; the paper trains
up to 100 × 5 of them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from benchmarks.common import best_time, emit, machine
from experiments import paper
from persim_jax import data
from persim_jax.methods import bcq, cadm
from persim_jax.persim import model, train

# CartPole-like: D = 4, 2 discrete actions; HalfCheetah-like: D = 18, A = 6.
SETTINGS = {
    "mountaincar": dict(obs_dim=2, num_actions=3),
    "cartpole": dict(obs_dim=4, num_actions=2),
    "halfcheetah": dict(obs_dim=18, action_dim=6),
}

_SETTINGS = flags.DEFINE_list("settings", ["cartpole", "halfcheetah"], "Settings to measure.")
_AGENTS = flags.DEFINE_integer("agents", 500, "Number of agents N.")
_ENSEMBLE = flags.DEFINE_integer("ensemble_size", 5, "Ensemble members M.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Minibatch size.")
_BATCHES = flags.DEFINE_integer(
    "batches", 0, "Minibatches per timed epoch (0: 100 classic, 10 halfcheetah).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats; the best is reported.")
_BASELINES = flags.DEFINE_list(
    "baselines", [], "Baselines to time instead: vanilla_cadm, pe_ts_cadm, bcq_p, bcq_a.")
_BCQ_CHUNK = flags.DEFINE_integer("bcq_chunk", 2000, "BCQ iterations per timed call.")
_CADM_BATCHES = flags.DEFINE_integer("cadm_batches", 50, "CaDM minibatches per timed epoch.")
_CADM_STEPS = flags.DEFINE_integer(
    "cadm_steps", 180, "Transitions per agent for CaDM's epoch estimate (CartPole pure: ~180).")

BASELINES = ("vanilla_cadm", "pe_ts_cadm", "bcq_p", "bcq_a")


def synthetic_batch(key, num_rows, config: model.ModelConfig) -> train.Batch:
    keys = jax.random.split(key, 4)
    if config.discrete:
        action = jax.random.randint(keys[0], (num_rows,), 0, config.num_actions)
    else:
        action = jax.random.normal(keys[0], (num_rows, config.action_dim))
    return train.Batch(
        agent_id=jax.random.randint(keys[1], (num_rows,), 0, config.num_agents),
        obs=jax.random.normal(keys[2], (num_rows, config.obs_dim)),
        action=action,
        target=jax.random.normal(keys[3], (num_rows, config.obs_dim)),
        weight=jnp.ones((num_rows,)),
    )


def measure(name: str, num_agents: int, ensemble_size: int, batch_size: int, num_batches: int,
            repeats: int) -> dict:
    config = model.ModelConfig(num_agents=num_agents, **SETTINGS[name], **paper.model_sizes(name))
    num_train = num_batches * batch_size
    num_validation = num_train // 4
    key = jax.random.PRNGKey(0)
    data = synthetic_batch(key, num_train, config)
    validation = train.chunk_batch(synthetic_batch(jax.random.PRNGKey(1), num_validation, config),
                              min(train.VALIDATION_CHUNK, num_validation))
    state = train.init_train_state(jax.random.PRNGKey(2), config, ensemble_size,
                                   optax.adam(1e-3))
    rates = {}
    for label, has_validation in (("train", False), ("fit", True)):
        epoch = train.make_epoch_fn(config, 1e-3, batch_size, num_train, has_validation)
        fn = functools.partial(epoch, state, data, validation, jax.random.PRNGKey(3))
        jax.block_until_ready(fn())  # compile
        rates[label] = num_train / best_time(fn, repeats)
    return {
        "bench": "train",
        "setting": name,
        "agents": num_agents,
        "ensemble_size": ensemble_size,
        "batch_size": batch_size,
        "batches_per_epoch": num_batches,
        "rank": config.rank,
        "state_hidden": list(config.state_hidden),
        "action_hidden": list(config.action_hidden) if not config.discrete else [],
        "params_per_member": model.count_params(
            jax.tree.map(lambda x: x[0], state.params)),
        "train_transitions_per_s": round(rates["train"], 1),
        "fit_transitions_per_s": round(rates["fit"], 1),
        **machine(),
    }


def synthetic_transitions(key, name: str, num_agents: int, steps: int) -> data.Transitions:
    """`steps` random transitions of each of `num_agents` agents, of the
    setting's shapes (the cost does not depend on the values)."""
    shapes = SETTINGS[name]
    keys = jax.random.split(key, 3)
    rows = num_agents * steps
    obs = jax.random.normal(keys[0], (rows, shapes["obs_dim"]))
    if "num_actions" in shapes:
        action = jax.random.randint(keys[1], (rows,), 0, shapes["num_actions"])
    else:
        action = jax.random.uniform(keys[1], (rows, shapes["action_dim"]), minval=-1, maxval=1)
    return data.make_transitions(
        obs, action, obs + 0.01 * jax.random.normal(keys[2], obs.shape),
        jnp.repeat(jnp.arange(num_agents), steps), num_actions=shapes.get("num_actions"))


def measure_bcq(name: str, baseline: str, chunk: int, repeats: int) -> dict:
    """BCQ iterations per second per policy, one compiled chunk timed."""
    transitions = synthetic_transitions(jax.random.PRNGKey(0), name, 20, 200)
    agent_ids = list(range(5)) if baseline == "bcq_a" else None
    config = bcq.BCQConfig().resolved(transitions.discrete)
    policy_data = bcq.policy_data(transitions, agent_ids)
    count = policy_data.count.shape[0]
    keys = jax.random.split(jax.random.PRNGKey(1), count)
    init = bcq.init_discrete if transitions.discrete else bcq.init_continuous
    size = transitions.num_actions or transitions.action_dim
    state = jax.vmap(lambda k: init(k, transitions.obs_dim, size, config))(keys)
    program = bcq.make_chunk_fn(config, transitions.discrete, chunk)
    fn = functools.partial(program, state, policy_data, keys, 0)
    jax.block_until_ready(fn())  # compile
    seconds = best_time(fn, repeats)
    return {"bench": "train_baseline", "baseline": baseline, "setting": name,
            "policies": count, "batch_size": config.batch_size,
            "iterations_per_s": round(chunk / seconds, 1),
            "paper_iterations_s": round(550_000 * seconds / chunk, 1), **machine()}


def measure_cadm(name: str, baseline: str, batches: int, repeats: int, steps: int) -> dict:
    """CaDM pairs per second (all members), one compiled epoch timed."""
    transitions = synthetic_transitions(jax.random.PRNGKey(0), name, 20, 200)
    config = cadm.PE_TS if baseline == "pe_ts_cadm" else cadm.VANILLA
    pairs = cadm.pair_data(transitions, config)
    stats = cadm.compute_stats(pairs, transitions.discrete)
    params = cadm.init_params(jax.random.PRNGKey(1), config, transitions.obs_dim,
                              int(pairs.action.shape[-1]))
    opt_state = cadm.make_optimizer(config).init(params)
    order = jax.random.randint(jax.random.PRNGKey(2),
                               (batches, config.ensemble_size, config.batch_size), 0,
                               pairs.pairs.shape[0])
    program = cadm.epoch_program(config)
    fn = functools.partial(program, params, opt_state, stats, pairs, order)
    jax.block_until_ready(fn())  # compile
    seconds = best_time(fn, repeats)
    member_pairs = batches * config.ensemble_size * config.batch_size
    per_epoch = 500 * steps * config.future        # pairs of 500 agents' trajectories (≈)
    return {"bench": "train_baseline", "baseline": baseline, "setting": name,
            "members": config.ensemble_size, "batch_size": config.batch_size,
            "pairs_per_s": round(member_pairs / seconds, 1),
            "epoch_s": round(per_epoch * config.ensemble_size * seconds / member_pairs, 1),
            **machine()}


def main(argv):
    del argv
    for name in _SETTINGS.value:
        if name not in SETTINGS:
            raise app.UsageError(f"--settings: unknown {name!r}; known: {sorted(SETTINGS)}")
        unknown = sorted(set(_BASELINES.value) - set(BASELINES))
        if unknown:
            raise app.UsageError(f"--baselines: unknown {unknown}; known: {', '.join(BASELINES)}")
        if not _BASELINES.value:
            batches = _BATCHES.value or (10 if name == "halfcheetah" else 100)
            emit(measure(name, _AGENTS.value, _ENSEMBLE.value, _BATCH.value, batches,
                         _REPEATS.value))
        for baseline in _BASELINES.value:
            if baseline.endswith("cadm"):
                emit(measure_cadm(name, baseline, _CADM_BATCHES.value, _REPEATS.value,
                                  _CADM_STEPS.value))
            else:
                emit(measure_bcq(name, baseline, _BCQ_CHUNK.value, _REPEATS.value))


if __name__ == "__main__":
    app.run(main)
