"""MPC planning throughput at the paper's planner settings and model sizes.

    python -m benchmarks.mpc_throughput [--settings=cartpole,mountaincar,halfcheetah]
        [--batched_agents=5] [--batched_episodes=20] [--repeats=10] [--chunk=-1]

Prints one JSON line per (setting, batch): the wall time of one jitted call
of the planner on a learned-simulator-sized ensemble (M = 5 members of the
paper's size with random parameters, 500 agents: the cost does not depend on
the values), divided by the plans it computes (`agents`): one plan, or one
plan for each of 5 agents × 20 episodes in one call (as
`evaluation.run_episodes` batches them: the plans split over the devices, and
on each device `lax.map` over chunks of `--chunk` plans, each chunk vmapped;
by default one plan at a time on CPU, which is the fastest there, and all at
once on accelerators). A single plan splits its candidates over the devices
(the planner's `shard_candidates`). On a CPU the script first makes JAX show
one device per core (`persim_jax.use_cpu_cores`; JAX_NUM_CPU_DEVICES=1 in the
environment measures JAX's default single device). Settings (docs/design.md):
CartPole and MountainCar random shooting 1000 candidates × horizon 30 / 50;
HalfCheetah CEM 200 samples × 30 × (1 + 5) rounds.

`model_transitions_per_s` = candidates × horizon × ensemble × rounds × agents
/ s. `model_flops_per_transition` counts 2 · fan_in · fan_out of every dense
layer of the paper's network (state encoder, and the action encoder for
continuous actions; the one-hot agent and action encoders are lookups) plus
the rank contraction; `model_flops_per_s` is the rate that implies.
`executed_flops_per_transition` is what the planner actually computes after
hoisting candidate-independent work (`persim_jax.dynamics.simulator_dynamics`: for
discrete actions the action factor is folded into the output layer).
`matmul_flops_per_s` is the best float32 dense matmul rate (2048³ and
1000 × 512 × 512) timed right after each of the planner's repeats, the
reference of `matmul_fraction` (the CPUs may be shared with other work: both
rates are bests over the same window). The first line reports a wider set of
matmul shapes; `matmul_fraction_of_start_best` is relative to its best.
"""

from __future__ import annotations

import functools
import math
import os

if __name__ == "__main__":
    # One JAX CPU device per core (JAX_NUM_CPU_DEVICES=1 keeps JAX's single
    # device), before gymnax, imported by envs, starts JAX's backends.
    from persim_jax import runtime
    runtime.use_cpu_cores()

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import Mesh, PartitionSpec

import envs
from benchmarks.common import best_time, emit, machine
from experiments import paper
from persim_jax import planning
from persim_jax.persim import model
from persim_jax.persim.simulator import Simulator
from persim_jax.dynamics import simulator_dynamics

SETTINGS = ("cartpole", "mountaincar", "halfcheetah")
NUM_AGENTS = 500
ENSEMBLE = 5

_SETTINGS = flags.DEFINE_list("settings", list(SETTINGS), "Settings to measure.")
_BATCHED_AGENTS = flags.DEFINE_integer("batched_agents", 5, "Agents of the batched call.")
_BATCHED_EPISODES = flags.DEFINE_integer("batched_episodes", 20, "Episodes per agent of the "
                                         "batched call (one plan each).")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed repeats; the best is reported.")
_BATCHED_REPEATS = flags.DEFINE_integer(
    "batched_repeats", 0, "Timed repeats of batched calls (0: 3, 1 for halfcheetah).")
_CHUNK = flags.DEFINE_integer(
    "chunk", -1, "Plans of the batched call computed at once (`lax.map` batch size, as "
    "`run_episodes(chunk_size=...)`); 0: all at once (vmap); -1: as run_episodes' default "
    "(1 on CPU, all at once on accelerators).")
_MODES = flags.DEFINE_list("modes", ["single", "batched"], "single: one plan per call; "
                           "batched: batched_agents × batched_episodes plans per call.")
_MATMUL = flags.DEFINE_bool("matmul", True, "Measure the dense matmul rate.")


def measure_matmul(repeats: int = 20) -> dict:
    """Best float32 matmul FLOP/s over square and planner-like shapes."""
    shapes = [(1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096),
              (1000, 512, 512), (5000, 256, 256), (10000, 512, 512)]
    rates = {}
    for m, k, n in shapes:
        a = jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.float32)
        b = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.float32)
        matmul = jax.jit(jnp.matmul)
        seconds = best_time(lambda: matmul(a, b), repeats)
        rates[f"{m}x{k}x{n}"] = 2.0 * m * k * n / seconds
    return rates


@functools.lru_cache(maxsize=1)
def reference_matmuls():
    """(flops, compiled call) of the float32 matmuls timed beside the planner:
    a square 2048 and the HalfCheetah layer shape (1000 × 512) @ (512 × 512)."""
    out = []
    for m, k, n in ((2048, 2048, 2048), (1000, 512, 512)):
        a = jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.float32)
        b = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.float32)
        compiled = jax.jit(jnp.matmul).lower(a, b).compile()
        out.append((2.0 * m * k * n, functools.partial(compiled, a, b)))
    return tuple(out)


def paper_simulator(name: str, env) -> Simulator:
    """M = 5 members of the paper's size for `env`, PyTorch-default random
    parameters, non-trivial standardisation statistics."""
    sizes = paper.model_sizes(name)
    if env.discrete_actions:
        config = model.ModelConfig(num_agents=NUM_AGENTS, obs_dim=env.obs_dim,
                                   num_actions=env.num_actions, **sizes)
        action_stats = (jnp.zeros((0,)), jnp.ones((0,)))
    else:
        config = model.ModelConfig(num_agents=NUM_AGENTS, obs_dim=env.obs_dim,
                                   action_dim=env.action_dim, **sizes)
        action_stats = (jnp.zeros((env.action_dim,)), jnp.full((env.action_dim,), 0.6))
    keys = jax.random.split(jax.random.PRNGKey(0), ENSEMBLE)
    params = jax.vmap(model.init_params, in_axes=(0, None))(keys, config)
    dim = env.obs_dim
    stats = model.NormStats(jnp.zeros((dim,)), jnp.ones((dim,)), jnp.zeros((dim,)),
                            jnp.full((dim,), 0.05), *action_stats)
    return Simulator(params=params, stats=stats, validation_loss=jnp.zeros(ENSEMBLE),
                           config=config)


def _dense_flops(sizes) -> int:
    return sum(2 * a * b for a, b in zip(sizes[:-1], sizes[1:]))


def flops_per_transition(config: model.ModelConfig) -> tuple[int, int]:
    """(paper's network, what the planner executes) FLOPs per model transition."""
    dim, rank = config.obs_dim, config.rank
    state = _dense_flops((dim, *config.state_hidden, dim * rank))
    contraction = 2 * dim * rank
    if config.discrete:
        nominal = state + contraction
        # Output layer and contraction folded into (hidden, num_actions · D).
        executed = _dense_flops((dim, *config.state_hidden, config.num_actions * dim))
        return nominal, executed
    action = _dense_flops((config.action_dim, *config.action_hidden, rank))
    return state + action + contraction, state + action + contraction


def measure(name: str, num_plans: int, repeats: int, matmul_rate: float | None,
            chunk: int = 0) -> dict:
    env = envs.make(name)
    simulator = paper_simulator(name, env)
    planner = paper.planner(env)
    config = planner.config
    discrete = env.discrete_actions
    candidates = config.num_candidates if discrete else config.num_samples
    rounds = 1 if discrete else 1 + config.num_rounds

    def one_plan(key, state, obs, agent_id):
        dynamics = simulator_dynamics(simulator, agent_id)
        return planner.plan(key, state, obs, dynamics)

    keys = jax.random.split(jax.random.PRNGKey(1), num_plans)
    obs = 0.05 * jax.random.normal(jax.random.PRNGKey(2), (num_plans, env.obs_dim))
    agent_ids = jnp.arange(num_plans, dtype=jnp.int32) % NUM_AGENTS
    state = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_plans, *x.shape)), planner.init())
    devices = jax.devices()
    if num_plans == 1:
        # One plan: its candidates are split over the devices (planner's
        # shard_candidates) when there are several.
        fn = jax.jit(one_plan)
        args = (keys[0], jax.tree.map(lambda x: x[0], state), obs[0], agent_ids[0])
    else:
        # As run_episodes: the plans split over the devices, each device
        # computing its share `chunk` plans at a time.
        padded = math.ceil(num_plans / len(devices)) * len(devices)
        take = np.minimum(np.arange(padded), num_plans - 1)
        args = jax.tree.map(lambda x: x[take], (keys, state, obs, agent_ids))
        per_device = padded // len(devices)

        def local(*xs):
            if chunk and chunk < per_device:
                return jax.lax.map(lambda x: one_plan(*x), xs, batch_size=chunk)
            return jax.vmap(one_plan)(*xs)

        mesh = Mesh(np.asarray(devices), ("plans",))
        fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=PartitionSpec("plans"),
                                   out_specs=PartitionSpec("plans"), check_vma=False))
    compiled = fn.lower(*args).compile()
    memory = compiled.memory_analysis()
    call = functools.partial(compiled, *args)
    jax.block_until_ready(call())
    # The machine's CPUs may be shared: time a reference matmul after every
    # planner call, so that the fraction compares the best moments of both.
    seconds, reference = math.inf, 0.0
    for _ in range(repeats):
        seconds = min(seconds, best_time(call, 1))
        reference = max(reference, *(flops / best_time(matmul, 2)
                                     for flops, matmul in reference_matmuls()))
    transitions = candidates * config.horizon * ENSEMBLE * rounds * num_plans
    nominal, executed = flops_per_transition(simulator.config)
    rate = transitions / seconds
    record = {
        "bench": "mpc",
        "env": name,
        "planner": "random_shooting" if discrete else "cem",
        "agents": num_plans,
        "candidates": candidates,
        "horizon": config.horizon,
        "ensemble": ENSEMBLE,
        "rounds": rounds,
        "seconds_per_plan": seconds / num_plans,
        "model_transitions_per_s": round(rate, 1),
        "model_flops_per_transition": nominal,
        "model_flops_per_s": round(rate * nominal, 1),
        "executed_flops_per_transition": executed,
        "executed_flops_per_s": round(rate * executed, 1),
        "chunk": chunk if 1 < num_plans and 0 < chunk < num_plans else num_plans,
        "devices": len(devices),
        "temp_bytes": None if memory is None else int(memory.temp_size_in_bytes),
        # Other processes on the machine (shared CPUs) lower every figure.
        "loadavg_1min": os.getloadavg()[0],
    }
    record["matmul_flops_per_s"] = round(reference, 1)
    record["matmul_fraction"] = round(rate * nominal / reference, 3)
    if matmul_rate:
        record["matmul_fraction_of_start_best"] = round(rate * nominal / matmul_rate, 3)
    record.update(machine())
    return record


def main(argv):
    del argv
    for name in _SETTINGS.value:
        if name not in SETTINGS:
            raise app.UsageError(f"--settings: unknown {name!r}; known: {list(SETTINGS)}")
    matmul_rate = None
    if _MATMUL.value:
        rates = measure_matmul()
        matmul_rate = max(rates.values())
        emit({"bench": "matmul", "flops_per_s": {k: round(v, 1) for k, v in rates.items()},
              "best_flops_per_s": round(matmul_rate, 1), "loadavg_1min": os.getloadavg()[0],
              **machine()})
    batched = _BATCHED_AGENTS.value * _BATCHED_EPISODES.value
    chunk = _CHUNK.value
    if chunk < 0:
        chunk = 1 if jax.devices()[0].platform == "cpu" else 0
    for name in _SETTINGS.value:
        if "single" in _MODES.value:
            emit(measure(name, 1, _REPEATS.value, matmul_rate))
        if "batched" not in _MODES.value:
            continue
        repeats = _BATCHED_REPEATS.value or (1 if name == "halfcheetah" else 3)
        record = measure(name, batched, repeats, matmul_rate, chunk)
        record.update(batched_agents=_BATCHED_AGENTS.value,
                      batched_episodes=_BATCHED_EPISODES.value)
        emit(record)


if __name__ == "__main__":
    app.run(main)
