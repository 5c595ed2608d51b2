"""Double DQN for the discrete envs, vmapped over agents: K policies, one
jitted program.

Every agent has its own Q-network, target network, Adam state, replay buffer
(`replay.ReplayBuffer`) and `num_envs` copies of its environment. One
training step of one agent plays one ε-greedy action in each of its envs,
stores the transitions, and takes one Adam step on a minibatch from its
buffer; `vmap` lifts it to K agents and `lax.scan` runs `eval_every` steps
inside one jitted call. The Python loop outside only evaluates, keeps the
best params of each agent and reports progress.

Reward shaping: a car-on-a-hill env's reward (MountainCar's) is -1 per step
until the goal, which ε-greedy exploration rarely reaches on heavy-gravity
agents. With `shaping_scale > 0` the learner is trained on
r + γΦ(s') − Φ(s), with Φ the car's mechanical energy (v²/2 + g·sin(3p)/3,
scaled): potential-based shaping (Ng et al., 1999) leaves the optimal policy
unchanged. Evaluation and the reported returns always use the env's true
reward.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from experiments.datagen import policies, replay


@struct.dataclass
class AgentState:
    """Training state of one agent."""

    params: Any
    target_params: Any
    opt_state: Any
    buffer: replay.ReplayBuffer
    env_state: Any
    obs: jax.Array           # (num_envs, D)
    key: jax.Array
    step: jax.Array          # () int32 env steps taken (per env)


@struct.dataclass
class Metrics:
    """(K,) per-agent training metrics of the last chunk."""

    loss: jax.Array
    q_mean: jax.Array
    epsilon: jax.Array


@dataclasses.dataclass(frozen=True)
class Learner:
    """What one agent's training step needs: the env, the Q-network, the
    optimiser and the hyperparameters of `train` (see there)."""

    env: Any
    network: nn.Module
    optimizer: optax.GradientTransformation
    num_envs: int
    buffer_size: int
    batch_size: int
    discount: float
    tau: float
    epsilon_start: float
    epsilon_end: float
    decay_steps: int
    learning_starts: int
    shaping_scale: float


def mechanical_energy(obs, gravity):
    """MountainCar energy per unit mass, v²/2 + g·sin(3p)/3 (gymnax's force
    field is −g·cos(3p), whose potential is g·sin(3p)/3); (...) for obs (..., 2)."""
    return 0.5 * obs[..., 1] ** 2 + gravity * jnp.sin(3.0 * obs[..., 0]) / 3.0


def check_shaping(env) -> None:
    """Raises ValueError unless `env` has what the energy shaping needs: a
    (position, velocity) observation and a `gravity` parameter."""
    missing = []
    if env.obs_dim != 2:
        missing.append(f"a (position, velocity) observation (obs_dim 2, not {env.obs_dim})")
    if not hasattr(env.default_params, "gravity"):
        missing.append("a `gravity` env parameter")
    if missing:
        raise ValueError(f"shaping_scale: the energy shaping needs {' and '.join(missing)}, "
                         f"which {env.name} does not have; set shaping_scale=0")


def _validate(env, covariates, shaping_scale, sizes: dict) -> np.ndarray:
    """(K, P) float32 covariates, after checking the env and the sizes."""
    if not env.discrete_actions:
        raise ValueError(f"DQN needs discrete actions; {env.name} is continuous "
                         "(use experiments.datagen.td3)")
    covariates = np.asarray(env.agents.validate(covariates), np.float32)
    if covariates.ndim != 2:
        raise ValueError(f"covariates must have shape (K, P); got {covariates.shape}")
    if shaping_scale:
        check_shaping(env)
    for name, value in sizes.items():
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1; got {value}")
    return covariates


# ---------------------------------------------------------------------------
# One agent's training step


def epsilon_at(learner: Learner, step):
    """ε after `step` steps: linear from epsilon_start to epsilon_end over decay_steps."""
    frac = jnp.clip(step / learner.decay_steps, 0.0, 1.0)
    return learner.epsilon_start + frac * (learner.epsilon_end - learner.epsilon_start)


def _broadcast(env_params, num_envs: int):
    """One agent's env params repeated over its num_envs env copies."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_envs,)), env_params)


def init_agent(learner: Learner, key: jax.Array, env_params) -> AgentState:
    """A fresh agent: new Q-network (target = online), empty buffer, reset envs."""
    env = learner.env
    net_key, reset_key, key = jax.random.split(key, 3)
    params = learner.network.init(net_key, jnp.zeros((env.obs_dim,), jnp.float32))
    obs, env_state = jax.vmap(env.reset)(jax.random.split(reset_key, learner.num_envs),
                                         _broadcast(env_params, learner.num_envs))
    return AgentState(params=params, target_params=params,
                      opt_state=learner.optimizer.init(params),
                      buffer=replay.init(learner.buffer_size, env.obs_dim), env_state=env_state,
                      obs=obs, key=key, step=jnp.zeros((), jnp.int32))


def td_loss(learner: Learner, params, target_params, batch: replay.Batch):
    """(Huber TD loss, mean Q of the taken actions) of a minibatch."""
    network = learner.network
    q = network.apply(params, batch.obs)
    q_taken = jnp.take_along_axis(q, batch.action[:, None], axis=-1)[:, 0]
    # Double DQN: the online net picks the next action, the target net values it.
    next_action = jnp.argmax(network.apply(params, batch.next_obs), axis=-1)
    next_q = jnp.take_along_axis(network.apply(target_params, batch.next_obs),
                                 next_action[:, None], axis=-1)[:, 0]
    target = batch.reward + learner.discount * (1.0 - batch.terminal) * next_q
    loss = jnp.mean(optax.huber_loss(q_taken, jax.lax.stop_gradient(target)))
    return loss, jnp.mean(q_taken)


def collect(learner: Learner, agent: AgentState, env_params, act_key, env_key, epsilon):
    """One ε-greedy action in each env copy, stored in the buffer (with the
    shaped reward). Returns (buffer, next obs (num_envs, D), env state)."""
    env, num_envs = learner.env, learner.num_envs
    greedy = jnp.argmax(learner.network.apply(agent.params, agent.obs), axis=-1).astype(jnp.int32)
    action, _ = policies.epsilon_mix(env, act_key, greedy, epsilon)
    obs, env_state, reward, _, info = jax.vmap(env.step)(
        jax.random.split(env_key, num_envs), agent.env_state, action,
        _broadcast(env_params, num_envs))
    next_obs = info["final_observation"]
    terminal = info["terminated"].astype(jnp.float32)
    if learner.shaping_scale:
        gravity = env_params.gravity
        phi = learner.shaping_scale * mechanical_energy(agent.obs, gravity)
        next_phi = learner.shaping_scale * mechanical_energy(next_obs, gravity)
        reward = reward + learner.discount * next_phi - phi
    buffer = replay.add(agent.buffer, agent.obs, action, reward, next_obs, terminal)
    return buffer, obs, env_state


def train_step(learner: Learner, agent: AgentState, env_params) -> tuple[AgentState, Metrics]:
    """One env step in each env copy, then one Adam step on a minibatch (kept
    only once `learning_starts` transitions have been played)."""
    key, act_key, env_key, batch_key = jax.random.split(agent.key, 4)
    epsilon = epsilon_at(learner, agent.step)
    buffer, obs, env_state = collect(learner, agent, env_params, act_key, env_key, epsilon)
    batch = replay.sample(buffer, batch_key, learner.batch_size)
    (loss, q_mean), grads = jax.value_and_grad(
        functools.partial(td_loss, learner), has_aux=True)(agent.params, agent.target_params,
                                                           batch)
    updates, opt_state = learner.optimizer.update(grads, agent.opt_state, agent.params)
    params = optax.apply_updates(agent.params, updates)
    target_params = optax.incremental_update(params, agent.target_params, learner.tau)
    learn = agent.step * learner.num_envs >= learner.learning_starts
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(learn, a, b), new, old)
    agent = agent.replace(
        params=keep(params, agent.params), target_params=keep(target_params, agent.target_params),
        opt_state=keep(opt_state, agent.opt_state), buffer=buffer, env_state=env_state, obs=obs,
        key=key, step=agent.step + 1)
    return agent, Metrics(loss=loss, q_mean=q_mean, epsilon=epsilon)


# ---------------------------------------------------------------------------
# The compiled programs of K agents and the outer loop


def compile_programs(learner: Learner, env_params, num_agents: int, eval_every: int):
    """(init_all(key) -> K stacked AgentStates, run_chunk(agents) -> (agents,
    Metrics averaged over the chunk)): `eval_every` vmapped training steps in
    one jitted scan, the agents' buffers donated."""

    @jax.jit
    def init_all(key):
        init = functools.partial(init_agent, learner)
        return jax.vmap(init)(jax.random.split(key, num_agents), env_params)

    @functools.partial(jax.jit, donate_argnums=0)
    def run_chunk(agents):
        def body(agents, _):
            return jax.vmap(functools.partial(train_step, learner))(agents, env_params)
        agents, metrics = jax.lax.scan(body, agents, None, length=eval_every)
        return agents, jax.tree.map(lambda x: jnp.mean(x, axis=0), metrics)

    return init_all, run_chunk


def _training_loop(env, covariates, key, init_all, run_chunk, *, num_chunks, eval_every,
                   eval_episodes, eval_epsilon, progress_fn):
    """Runs the chunks, evaluating after each and keeping every agent's best
    params. Returns (best_params, best_returns (K,), history)."""
    init_key, eval_key = jax.random.split(key)
    agents = init_all(init_key)
    best_params = jax.tree.map(jnp.copy, agents.params)   # run_chunk donates agents
    best_returns = np.full(covariates.shape[0], -np.inf)
    history = []
    start = time.time()
    for chunk in range(num_chunks):
        agents, metrics = run_chunk(agents)
        eval_key, sub = jax.random.split(eval_key)
        returns = policies.evaluate(env, agents.params, covariates, sub,
                                    num_episodes=eval_episodes, epsilon=eval_epsilon).mean(axis=1)
        improved = returns > best_returns
        best_returns = np.where(improved, returns, best_returns)
        best_params = policies.select(improved, agents.params, best_params)
        record = {
            "step": (chunk + 1) * eval_every,
            "returns": returns.tolist(),
            "best_returns": best_returns.tolist(),
            "loss": np.asarray(metrics.loss).tolist(),
            "q_mean": np.asarray(metrics.q_mean).tolist(),
            "epsilon": float(np.asarray(metrics.epsilon)[0]),
            "elapsed_s": time.time() - start,
        }
        history.append(record)
        if progress_fn is not None:
            progress_fn(record["step"], record)
    return best_params, best_returns, history


def train(
    env,
    covariates,
    *,
    key: jax.Array,
    num_timesteps: int = 100_000,
    num_envs: int = 4,
    hidden: tuple[int, ...] = (256, 256),
    learning_rate: float = 5e-4,
    batch_size: int = 128,
    buffer_size: int = 50_000,
    discount: float = 0.99,
    tau: float = 0.005,
    epsilon_start: float = 1.0,
    epsilon_end: float = 0.05,
    exploration_fraction: float = 0.3,
    learning_starts: int = 1_000,
    shaping_scale: float = 0.0,
    max_grad_norm: float = 10.0,
    eval_every: int = 2_500,
    eval_episodes: int = 10,
    eval_epsilon: float = 0.0,
    progress_fn: Callable[[int, dict], None] | None = None,
) -> tuple[Any, np.ndarray, list[dict]]:
    """Trains K Q-networks, policy k on agent `covariates[k]`, as one vmapped program.

    Args:
      env: a discrete-action environment.
      covariates: (K, P) the agents to train on.
      key: PRNG key.
      num_timesteps: environment steps per env copy (each agent sees
        num_timesteps × num_envs transitions and takes num_timesteps
        gradient steps).
      num_envs: env copies per agent, stepped in parallel.
      hidden: hidden widths (the authors': 256, 256).
      learning_rate, batch_size, buffer_size, discount: the usual.
      tau: Polyak rate of the target network.
      epsilon_start, epsilon_end, exploration_fraction: ε decays linearly
        from start to end over that fraction of the steps.
      learning_starts: steps of pure exploration before learning.
      shaping_scale: weight of the potential-based energy shaping (0 = off;
        needs a (position, velocity) observation and a `gravity` parameter).
      max_grad_norm: gradient clipping.
      eval_every: steps between evaluations (one jitted scan each).
      eval_episodes: greedy episodes per agent at each evaluation, under the
        true reward.
      eval_epsilon: ε used during evaluation.
      progress_fn: called as progress_fn(step, metrics) after each evaluation;
        metrics has `returns` (K,) mean evaluation returns, `best_returns`
        (K,), `loss` (K,), `q_mean` (K,), `epsilon`, `elapsed_s`.

    Returns:
      (best_params, best_returns, history): params stacked over K, the best
      evaluated of each agent; (K,) their mean evaluation returns; the list of
      metrics dicts passed to progress_fn.
    """
    covariates = _validate(env, covariates, shaping_scale, dict(
        num_timesteps=num_timesteps, num_envs=num_envs, batch_size=batch_size,
        buffer_size=buffer_size, eval_every=eval_every, eval_episodes=eval_episodes))
    learner = Learner(
        env=env, network=policies.QNetwork(num_actions=env.num_actions, hidden=tuple(hidden)),
        optimizer=optax.chain(optax.clip_by_global_norm(max_grad_norm),
                              optax.adam(learning_rate)),
        num_envs=num_envs, buffer_size=buffer_size, batch_size=batch_size, discount=discount,
        tau=tau, epsilon_start=epsilon_start, epsilon_end=epsilon_end,
        decay_steps=max(1, int(exploration_fraction * num_timesteps)),
        learning_starts=learning_starts, shaping_scale=shaping_scale)
    env_params = env.covariates_to_params(jnp.asarray(covariates))
    init_all, run_chunk = compile_programs(learner, env_params, covariates.shape[0], eval_every)
    return _training_loop(env, covariates, key, init_all, run_chunk,
                          num_chunks=-(-num_timesteps // eval_every), eval_every=eval_every,
                          eval_episodes=eval_episodes, eval_epsilon=eval_epsilon,
                          progress_fn=progress_fn)
