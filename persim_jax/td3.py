"""TD3 (Fujimoto et al., 2018) for HalfCheetah, vmapped over agents: K
policies, one jitted program.

The paper's HalfCheetah logging and test policies are TD3 actors (the
authors' test actor: 18 -> 256 -> 256 -> 6, tanh). Each agent has its own
actor, twin critic, target networks, Adam states, replay buffer (arrays in a
pytree) and `num_envs` copies of its environment. One training step of one
agent plays one noisy action in each env, stores the transitions and takes
one critic update; every `policy_delay` steps the actor and the target
networks are updated once. `vmap` lifts this to K agents and `lax.scan` runs
`eval_every` steps inside one jitted call. The Python loop outside only
evaluates, keeps each agent's best actor, reports progress and checkpoints.
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
    position: jax.Array
    size: jax.Array


@struct.dataclass
class AgentState:
    """Training state of one agent."""

    actor: Any
    critic: Any
    target_actor: Any
    target_critic: Any
    actor_opt: Any
    critic_opt: Any
    buffer: ReplayBuffer
    env_state: Any
    obs: jax.Array           # (num_envs, D)
    key: jax.Array
    step: jax.Array          # () env steps taken (per env)
    updates: jax.Array       # () critic updates taken


def train(
    env,
    covariates,
    *,
    key: jax.Array,
    num_timesteps: int = 200_000,
    num_envs: int = 1,
    hidden: tuple[int, ...] = (256, 256),
    actor_learning_rate: float = 3e-4,
    critic_learning_rate: float = 3e-4,
    batch_size: int = 256,
    buffer_size: int = 200_000,
    discount: float = 0.99,
    tau: float = 0.005,
    exploration_noise: float = 0.1,
    policy_noise: float = 0.2,
    noise_clip: float = 0.5,
    policy_delay: int = 2,
    learning_starts: int = 10_000,
    eval_every: int = 10_000,
    eval_episodes: int = 2,
    init_state: dict | None = None,
    init_best: tuple[Any, Any] | None = None,
    max_seconds: float | None = None,
    stop_returns=None,
    progress_fn: Callable[[int, dict], None] | None = None,
    checkpoint_fn: Callable[[Any, np.ndarray, dict], None] | None = None,
) -> tuple[Any, np.ndarray, list[dict]]:
    """Trains K TD3 actors, actor k on agent `covariates[k]`, as one vmapped program.

    Args:
      env: a continuous-action environment (`envs.make("halfcheetah")`).
      covariates: (K, P) the agents to train on.
      key: PRNG key.
      num_timesteps: vectorised env steps (each agent sees num_timesteps ×
        num_envs transitions and takes one critic update per step, one actor
        update every `policy_delay` steps).
      num_envs: env copies per agent, stepped in parallel.
      hidden: hidden widths of actor and critics (the authors': 256, 256).
      actor_learning_rate, critic_learning_rate, batch_size, buffer_size,
      discount, tau, exploration_noise, policy_noise, noise_clip,
      policy_delay: TD3's (paper defaults).
      learning_starts: transitions per agent taken with uniformly random
        actions before learning starts.
      eval_every: vectorised steps between evaluations.
      eval_episodes: deterministic episodes per agent at each evaluation.
      init_state: optional dict with stacked `actor`, `critic` params (e.g.
        from a previous run's `checkpoint_fn`) to start from; their target
        networks start equal to them and the buffer starts empty, filled
        during `learning_starts` with the actor's noisy actions (not uniform
        ones).
      init_best: optional (stacked actors, (K,) returns) to beat: an agent's
        best is replaced only by a better evaluation.
      max_seconds: wall-clock budget: training stops after the first
        evaluation past it (None: run all num_timesteps).
      stop_returns: optional (K,) returns at which to stop early, once every
        agent's best evaluation has reached its own.
      progress_fn: called as progress_fn(step, metrics) after each
        evaluation; metrics has `returns` (K,), `best_returns` (K,),
        `critic_loss` (K,), `q_mean` (K,), `elapsed_s`.
      checkpoint_fn: called as checkpoint_fn(best_actors, best_returns,
        {"actor", "critic"}) after each evaluation that improved an agent.

    Returns:
      (best_actors, best_returns, history): actor params stacked over K, the
      best evaluated of each agent; (K,) their mean evaluation returns; the
      metrics dicts passed to progress_fn.
    """
    if env.discrete_actions:
        raise ValueError(f"TD3 needs continuous actions; {env.name} is discrete (use persim_jax.dqn)")
    covariates = np.asarray(env.agents.validate(covariates), np.float32)
    if covariates.ndim != 2:
        raise ValueError(f"covariates must have shape (K, P); got {covariates.shape}")
    for name, value in (("num_timesteps", num_timesteps), ("num_envs", num_envs),
                        ("batch_size", batch_size),
                        ("buffer_size", buffer_size), ("policy_delay", policy_delay),
                        ("eval_every", eval_every), ("eval_episodes", eval_episodes)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1; got {value}")
    if eval_every % policy_delay:
        raise ValueError(f"eval_every ({eval_every}) must be a multiple of policy_delay ({policy_delay})")
    k = covariates.shape[0]
    actor_net = policies.Actor(action_dim=env.action_dim, hidden=tuple(hidden))
    critic_net = policies.Critic(hidden=tuple(hidden))
    actor_optimizer = optax.adam(actor_learning_rate)
    critic_optimizer = optax.adam(critic_learning_rate)
    action_dim = env.action_dim
    random_warmup = init_state is None

    def init_agent(key, env_params, actor=None, critic=None):
        actor_key, critic_key, reset_key, key = jax.random.split(key, 4)
        obs0 = jnp.zeros((env.obs_dim,), jnp.float32)
        if actor is None:
            actor = actor_net.init(actor_key, obs0)
            critic = critic_net.init(critic_key, obs0, jnp.zeros((action_dim,), jnp.float32))
        batched = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_envs,)), env_params)
        obs, env_state = jax.vmap(env.reset)(jax.random.split(reset_key, num_envs), batched)
        buffer = ReplayBuffer(
            obs=jnp.zeros((buffer_size, env.obs_dim), jnp.float32),
            action=jnp.zeros((buffer_size, action_dim), jnp.float32),
            reward=jnp.zeros((buffer_size,), jnp.float32),
            next_obs=jnp.zeros((buffer_size, env.obs_dim), jnp.float32),
            terminal=jnp.zeros((buffer_size,), jnp.float32),
            position=jnp.zeros((), jnp.int32), size=jnp.zeros((), jnp.int32))
        return AgentState(actor=actor, critic=critic, target_actor=actor, target_critic=critic,
                          actor_opt=actor_optimizer.init(actor),
                          critic_opt=critic_optimizer.init(critic), buffer=buffer,
                          env_state=env_state, obs=obs.astype(jnp.float32), key=key,
                          step=jnp.zeros((), jnp.int32), updates=jnp.zeros((), jnp.int32))

    def critic_loss_fn(critic, agent, batch, key):
        obs, action, reward, next_obs, terminal = batch
        noise = jnp.clip(policy_noise * jax.random.normal(key, action.shape), -noise_clip, noise_clip)
        next_action = jnp.clip(actor_net.apply(agent.target_actor, next_obs) + noise, -1.0, 1.0)
        target_q1, target_q2 = critic_net.apply(agent.target_critic, next_obs, next_action)
        target = reward + discount * (1.0 - terminal) * jnp.minimum(target_q1, target_q2)
        target = jax.lax.stop_gradient(target)
        q1, q2 = critic_net.apply(critic, obs, action)
        return jnp.mean((q1 - target) ** 2) + jnp.mean((q2 - target) ** 2), jnp.mean(q1)

    def actor_loss_fn(actor, critic, obs):
        q1, _ = critic_net.apply(critic, obs, actor_net.apply(actor, obs))
        return -jnp.mean(q1)

    def sample_batch(buf: ReplayBuffer, key):
        rows = jax.random.randint(key, (batch_size,), 0, jnp.maximum(buf.size, 1))
        return jax.tree.map(lambda x: x[rows], (buf.obs, buf.action, buf.reward, buf.next_obs,
                                                buf.terminal))

    def critic_update(agent: AgentState, key):
        batch_key, noise_key = jax.random.split(key)
        batch = sample_batch(agent.buffer, batch_key)
        (critic_loss, q_mean), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(
            agent.critic, agent, batch, noise_key)
        updates, critic_opt = critic_optimizer.update(grads, agent.critic_opt, agent.critic)
        critic = optax.apply_updates(agent.critic, updates)
        return agent.replace(critic=critic, critic_opt=critic_opt,
                             updates=agent.updates + 1), (critic_loss, q_mean)

    def actor_update(agent: AgentState):
        # The delayed policy update and the soft target updates (TD3).
        key, batch_key = jax.random.split(agent.key)
        obs = sample_batch(agent.buffer, batch_key)[0]
        grads = jax.grad(actor_loss_fn)(agent.actor, agent.critic, obs)
        updates, actor_opt = actor_optimizer.update(grads, agent.actor_opt, agent.actor)
        actor = optax.apply_updates(agent.actor, updates)
        return agent.replace(
            actor=actor, actor_opt=actor_opt, key=key,
            target_actor=optax.incremental_update(actor, agent.target_actor, tau),
            target_critic=optax.incremental_update(agent.critic, agent.target_critic, tau))

    def env_step(agent: AgentState, env_params):
        """One noisy action in each env copy, stored; then one critic update."""
        key, noise_key, random_key, env_key, update_key = jax.random.split(agent.key, 5)
        action = actor_net.apply(agent.actor, agent.obs)
        noise = exploration_noise * jax.random.normal(noise_key, action.shape)
        action = jnp.clip(action + noise, -1.0, 1.0)
        warmup = agent.step * num_envs < learning_starts
        if random_warmup:
            action = jnp.where(warmup, policies.random_action(env, random_key, (num_envs,)), action)
        batched = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_envs,)), env_params)
        obs, env_state, reward, _, info = jax.vmap(env.step)(
            jax.random.split(env_key, num_envs), agent.env_state, action, batched)
        buf = agent.buffer
        index = (buf.position + jnp.arange(num_envs)) % buffer_size
        buf = buf.replace(
            obs=buf.obs.at[index].set(agent.obs), action=buf.action.at[index].set(action),
            reward=buf.reward.at[index].set(reward),
            next_obs=buf.next_obs.at[index].set(info["final_observation"]),
            terminal=buf.terminal.at[index].set(info["terminated"].astype(jnp.float32)),
            position=(buf.position + num_envs) % buffer_size,
            size=jnp.minimum(buf.size + num_envs, buffer_size))
        agent = agent.replace(buffer=buf, env_state=env_state, obs=obs.astype(jnp.float32),
                              key=key, step=agent.step + 1)
        updated, metrics = critic_update(agent, update_key)
        return keep_if(jnp.logical_not(warmup), updated, agent), metrics

    def keep_if(condition, new, old):
        return jax.tree.map(lambda a, b: jnp.where(condition, a, b), new, old)

    def train_block(agent: AgentState, env_params):
        """`policy_delay` env steps, each with a critic update, then one actor
        and target update: TD3's delay as a static structure, so that no
        actor gradient is computed and discarded."""
        agent, (critic_loss, q_mean) = jax.lax.scan(
            lambda a, _: env_step(a, env_params), agent, None, length=policy_delay)
        learning = agent.step * num_envs > learning_starts
        agent = keep_if(learning, actor_update(agent), agent)
        return agent, (jnp.mean(critic_loss), jnp.mean(q_mean))

    env_params = env.covariates_to_params(jnp.asarray(covariates))

    @jax.jit
    def init_all(key, actor, critic):
        keys = jax.random.split(key, k)
        if actor is None:
            return jax.vmap(init_agent)(keys, env_params)
        return jax.vmap(init_agent)(keys, env_params, actor, critic)

    @functools.partial(jax.jit, donate_argnums=0)
    def run_chunk(agents):
        def body(agents, _):
            return jax.vmap(train_block)(agents, env_params)
        agents, (critic_loss, q_mean) = jax.lax.scan(body, agents, None,
                                                     length=eval_every // policy_delay)
        return agents, jnp.mean(critic_loss, axis=0), jnp.mean(q_mean, axis=0)

    init_key, eval_key = jax.random.split(key)
    agents = init_all(init_key, *((init_state["actor"], init_state["critic"]) if init_state
                                  else (None, None)))
    if init_best is not None:
        best_params = jax.tree.map(jnp.asarray, init_best[0])
        best_returns = np.asarray(init_best[1], np.float64).copy()
    else:
        best_params = jax.tree.map(jnp.copy, agents.actor)
        best_returns = np.full(k, -np.inf)
    history = []
    start = time.time()
    num_chunks = -(-num_timesteps // eval_every)
    for chunk in range(num_chunks):
        agents, critic_loss, q_mean = run_chunk(agents)
        eval_key, sub = jax.random.split(eval_key)
        returns = policies.evaluate(env, agents.actor, covariates, sub,
                                    num_episodes=eval_episodes).mean(axis=1)
        improved = returns > best_returns
        best_returns = np.where(improved, returns, best_returns)
        mask = jnp.asarray(improved)
        best_params = jax.tree.map(
            lambda new, old: jnp.where(mask.reshape((-1,) + (1,) * (new.ndim - 1)), new, old),
            agents.actor, best_params)
        record = {
            "step": (chunk + 1) * eval_every,
            "returns": returns.tolist(),
            "best_returns": best_returns.tolist(),
            "critic_loss": np.asarray(critic_loss).tolist(),
            "q_mean": np.asarray(q_mean).tolist(),
            "elapsed_s": time.time() - start,
        }
        history.append(record)
        if progress_fn is not None:
            progress_fn(record["step"], record)
        if checkpoint_fn is not None and improved.any():
            checkpoint_fn(best_params, best_returns,
                          {"actor": agents.actor, "critic": agents.critic})
        if max_seconds is not None and time.time() - start > max_seconds:
            break
        if stop_returns is not None and np.all(best_returns >= np.asarray(stop_returns)):
            break
    return best_params, best_returns, history
