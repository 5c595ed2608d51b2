"""Double DQN for the discrete envs, vmapped over agents: K policies, one
jitted program.

Every agent has its own Q-network, target network, Adam state, replay buffer
(arrays in a pytree) and `num_envs` copies of its environment. One training
step of one agent plays one ε-greedy action in each of its envs, stores the
transitions, and takes one Adam step on a minibatch from its buffer; `vmap`
lifts it to K agents and `lax.scan` runs `eval_every` steps inside one jitted
call. The Python loop outside only evaluates, keeps the best params of each
agent and reports progress.

Reward shaping: MountainCar's reward is -1 per step until the goal, which
ε-greedy exploration rarely reaches on heavy-gravity agents. With
`shaping_scale > 0` the learner is trained on r + γΦ(s') − Φ(s), with Φ the
car's mechanical energy (v²/2 + g·sin(3p)/3, scaled): potential-based
shaping (Ng et al., 1999) leaves the optimal policy unchanged. Evaluation and
the reported returns always use the env's true reward.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from persim_jax import policies


@struct.dataclass
class ReplayBuffer:
    """Circular buffer of one agent: leaves (capacity, ...)."""

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    next_obs: jax.Array
    terminal: jax.Array
    position: jax.Array      # () int32: next write index
    size: jax.Array          # () int32: number of filled rows


@struct.dataclass
class AgentState:
    """Training state of one agent."""

    params: Any
    target_params: Any
    opt_state: Any
    buffer: ReplayBuffer
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


def mechanical_energy(obs, gravity):
    """MountainCar energy per unit mass, v²/2 + g·sin(3p)/3 (gymnax's force
    field is −g·cos(3p), whose potential is g·sin(3p)/3); (...) for obs (..., 2)."""
    return 0.5 * obs[..., 1] ** 2 + gravity * jnp.sin(3.0 * obs[..., 0]) / 3.0


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
      env: a discrete-action environment (`envs.make("cartpole")`).
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
      shaping_scale: weight of the potential-based energy shaping (MountainCar
        only; 0 = off).
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
    if not env.discrete_actions:
        raise ValueError(f"DQN needs discrete actions; {env.name} is continuous (use persim_jax.td3)")
    covariates = np.asarray(env.agents.validate(covariates), np.float32)
    if covariates.ndim != 2:
        raise ValueError(f"covariates must have shape (K, P); got {covariates.shape}")
    if shaping_scale and env.name != "mountaincar":
        raise ValueError("shaping_scale is defined for MountainCar only")
    for name, value in (("num_timesteps", num_timesteps), ("num_envs", num_envs),
                        ("batch_size", batch_size), ("buffer_size", buffer_size),
                        ("eval_every", eval_every), ("eval_episodes", eval_episodes)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1; got {value}")
    k = covariates.shape[0]
    network = policies.QNetwork(num_actions=env.num_actions, hidden=tuple(hidden))
    optimizer = optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adam(learning_rate))
    decay_steps = max(1, int(exploration_fraction * num_timesteps))

    def epsilon_at(step):
        frac = jnp.clip(step / decay_steps, 0.0, 1.0)
        return epsilon_start + frac * (epsilon_end - epsilon_start)

    def init_agent(key, env_params):
        net_key, reset_key, key = jax.random.split(key, 3)
        params = network.init(net_key, jnp.zeros((env.obs_dim,), jnp.float32))
        batched = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_envs,)), env_params)
        obs, env_state = jax.vmap(env.reset)(jax.random.split(reset_key, num_envs), batched)
        buffer = ReplayBuffer(
            obs=jnp.zeros((buffer_size, env.obs_dim), jnp.float32),
            action=jnp.zeros((buffer_size,), jnp.int32),
            reward=jnp.zeros((buffer_size,), jnp.float32),
            next_obs=jnp.zeros((buffer_size, env.obs_dim), jnp.float32),
            terminal=jnp.zeros((buffer_size,), jnp.float32),
            position=jnp.zeros((), jnp.int32),
            size=jnp.zeros((), jnp.int32))
        return AgentState(params=params, target_params=params, opt_state=optimizer.init(params),
                          buffer=buffer, env_state=env_state, obs=obs, key=key,
                          step=jnp.zeros((), jnp.int32))

    def loss_fn(params, target_params, batch):
        obs, action, reward, next_obs, terminal = batch
        q = network.apply(params, obs)
        q_taken = jnp.take_along_axis(q, action[:, None], axis=-1)[:, 0]
        # Double DQN: the online net picks the next action, the target net values it.
        next_action = jnp.argmax(network.apply(params, next_obs), axis=-1)
        next_q = jnp.take_along_axis(network.apply(target_params, next_obs),
                                     next_action[:, None], axis=-1)[:, 0]
        target = reward + discount * (1.0 - terminal) * next_q
        loss = jnp.mean(optax.huber_loss(q_taken, jax.lax.stop_gradient(target)))
        return loss, jnp.mean(q_taken)

    def train_step(agent: AgentState, env_params):
        key, act_key, env_key, batch_key = jax.random.split(agent.key, 4)
        epsilon = epsilon_at(agent.step)
        greedy = jnp.argmax(network.apply(agent.params, agent.obs), axis=-1).astype(jnp.int32)
        action, _ = policies.epsilon_mix(env, act_key, greedy, epsilon)
        batched = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_envs,)), env_params)
        obs, env_state, reward, _, info = jax.vmap(env.step)(
            jax.random.split(env_key, num_envs), agent.env_state, action, batched)
        next_obs = info["final_observation"]
        terminal = info["terminated"].astype(jnp.float32)
        if shaping_scale:
            gravity = env_params.gravity
            phi = shaping_scale * mechanical_energy(agent.obs, gravity)
            next_phi = shaping_scale * mechanical_energy(next_obs, gravity)
            reward = reward + discount * next_phi - phi

        buf = agent.buffer
        index = (buf.position + jnp.arange(num_envs)) % buffer_size
        buf = buf.replace(
            obs=buf.obs.at[index].set(agent.obs), action=buf.action.at[index].set(action),
            reward=buf.reward.at[index].set(reward), next_obs=buf.next_obs.at[index].set(next_obs),
            terminal=buf.terminal.at[index].set(terminal),
            position=(buf.position + num_envs) % buffer_size,
            size=jnp.minimum(buf.size + num_envs, buffer_size))

        rows = jax.random.randint(batch_key, (batch_size,), 0, jnp.maximum(buf.size, 1))
        batch = jax.tree.map(lambda x: x[rows], (buf.obs, buf.action, buf.reward, buf.next_obs,
                                                 buf.terminal))
        (loss, q_mean), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            agent.params, agent.target_params, batch)
        updates, opt_state = optimizer.update(grads, agent.opt_state, agent.params)
        params = optax.apply_updates(agent.params, updates)
        target_params = optax.incremental_update(params, agent.target_params, tau)
        learn = agent.step * num_envs >= learning_starts
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(learn, a, b), new, old)
        agent = agent.replace(
            params=keep(params, agent.params), target_params=keep(target_params, agent.target_params),
            opt_state=keep(opt_state, agent.opt_state), buffer=buf, env_state=env_state, obs=obs,
            key=key, step=agent.step + 1)
        return agent, Metrics(loss=loss, q_mean=q_mean, epsilon=epsilon)

    env_params = env.covariates_to_params(jnp.asarray(covariates))

    @jax.jit
    def init_all(key):
        return jax.vmap(init_agent)(jax.random.split(key, k), env_params)

    @functools.partial(jax.jit, donate_argnums=0)
    def run_chunk(agents):
        def body(agents, _):
            agents, metrics = jax.vmap(train_step)(agents, env_params)
            return agents, metrics
        agents, metrics = jax.lax.scan(body, agents, None, length=eval_every)
        return agents, jax.tree.map(lambda x: jnp.mean(x, axis=0), metrics)

    init_key, eval_key = jax.random.split(key)
    agents = init_all(init_key)
    best_params = jax.tree.map(jnp.copy, agents.params)   # run_chunk donates agents
    best_returns = np.full(k, -np.inf)
    history = []
    start = time.time()
    num_chunks = -(-num_timesteps // eval_every)
    for chunk in range(num_chunks):
        agents, metrics = run_chunk(agents)
        eval_key, sub = jax.random.split(eval_key)
        returns = policies.evaluate(env, agents.params, covariates, sub,
                                    num_episodes=eval_episodes, epsilon=eval_epsilon).mean(axis=1)
        improved = returns > best_returns
        best_returns = np.where(improved, returns, best_returns)
        mask = jnp.asarray(improved)
        best_params = jax.tree.map(
            lambda new, old: jnp.where(mask.reshape((-1,) + (1,) * (new.ndim - 1)), new, old),
            agents.params, best_params)
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
