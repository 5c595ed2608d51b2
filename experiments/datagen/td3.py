"""TD3 (Fujimoto et al., 2018) for the continuous-action envs, vmapped over
agents: K policies, one jitted program.

The paper's HalfCheetah logging and test policies are TD3 actors (the
authors' test actor: 18 -> 256 -> 256 -> 6, tanh). Each agent has its own
actor, twin critic, target networks, Adam states, replay buffer
(`replay.ReplayBuffer`) and `num_envs` copies of its environment. One
training step of one agent plays one noisy action in each env, stores the
transitions and takes one critic update; every `policy_delay` steps the actor
and the target networks are updated once. `vmap` lifts this to K agents and
`lax.scan` runs `eval_every` steps inside one jitted call. The Python loop
outside only evaluates, keeps each agent's best actor, reports progress and
checkpoints.
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

    actor: Any
    critic: Any
    target_actor: Any
    target_critic: Any
    actor_opt: Any
    critic_opt: Any
    buffer: replay.ReplayBuffer
    env_state: Any
    obs: jax.Array           # (num_envs, D)
    key: jax.Array
    step: jax.Array          # () env steps taken (per env)
    updates: jax.Array       # () critic updates taken


@dataclasses.dataclass(frozen=True)
class Learner:
    """What one agent's training step needs: the env, the networks, the
    optimisers and the hyperparameters of `train` (see there).
    `random_warmup`: the first `learning_starts` transitions take uniformly
    random actions (a fresh start) rather than the actor's noisy ones (a
    resumed one)."""

    env: Any
    actor_net: nn.Module
    critic_net: nn.Module
    actor_optimizer: optax.GradientTransformation
    critic_optimizer: optax.GradientTransformation
    num_envs: int
    buffer_size: int
    batch_size: int
    discount: float
    tau: float
    exploration_noise: float
    policy_noise: float
    noise_clip: float
    policy_delay: int
    learning_starts: int
    random_warmup: bool


def _validate(env, covariates, sizes: dict) -> np.ndarray:
    """(K, P) float32 covariates, after checking the env and the sizes."""
    if env.discrete_actions:
        raise ValueError(f"TD3 needs continuous actions; {env.name} is discrete "
                         "(use experiments.datagen.dqn)")
    covariates = np.asarray(env.agents.validate(covariates), np.float32)
    if covariates.ndim != 2:
        raise ValueError(f"covariates must have shape (K, P); got {covariates.shape}")
    for name, value in sizes.items():
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1; got {value}")
    if sizes["eval_every"] % sizes["policy_delay"]:
        raise ValueError(f"eval_every ({sizes['eval_every']}) must be a multiple of policy_delay "
                         f"({sizes['policy_delay']})")
    return covariates


def _keep_if(condition, new, old):
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), new, old)


# ---------------------------------------------------------------------------
# One agent's training step


def init_agent(learner: Learner, key: jax.Array, env_params, actor=None,
               critic=None) -> AgentState:
    """An agent with new networks (or the given `actor`, `critic`), target
    networks equal to them, an empty buffer and reset envs."""
    env, num_envs = learner.env, learner.num_envs
    actor_key, critic_key, reset_key, key = jax.random.split(key, 4)
    obs0 = jnp.zeros((env.obs_dim,), jnp.float32)
    if actor is None:
        actor = learner.actor_net.init(actor_key, obs0)
        critic = learner.critic_net.init(critic_key, obs0,
                                         jnp.zeros((env.action_dim,), jnp.float32))
    batched = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_envs,)), env_params)
    obs, env_state = jax.vmap(env.reset)(jax.random.split(reset_key, num_envs), batched)
    buffer = replay.init(learner.buffer_size, env.obs_dim, (env.action_dim,), jnp.float32)
    return AgentState(actor=actor, critic=critic, target_actor=actor, target_critic=critic,
                      actor_opt=learner.actor_optimizer.init(actor),
                      critic_opt=learner.critic_optimizer.init(critic), buffer=buffer,
                      env_state=env_state, obs=obs.astype(jnp.float32), key=key,
                      step=jnp.zeros((), jnp.int32), updates=jnp.zeros((), jnp.int32))


def critic_loss(learner: Learner, critic, agent: AgentState, batch: replay.Batch, key):
    """(Twin-critic TD loss with target policy smoothing, mean Q1) of a minibatch."""
    noise = jnp.clip(learner.policy_noise * jax.random.normal(key, batch.action.shape),
                     -learner.noise_clip, learner.noise_clip)
    next_action = jnp.clip(learner.actor_net.apply(agent.target_actor, batch.next_obs) + noise,
                           -1.0, 1.0)
    target_q1, target_q2 = learner.critic_net.apply(agent.target_critic, batch.next_obs,
                                                    next_action)
    target = (batch.reward
              + learner.discount * (1.0 - batch.terminal) * jnp.minimum(target_q1, target_q2))
    target = jax.lax.stop_gradient(target)
    q1, q2 = learner.critic_net.apply(critic, batch.obs, batch.action)
    return jnp.mean((q1 - target) ** 2) + jnp.mean((q2 - target) ** 2), jnp.mean(q1)


def actor_loss(learner: Learner, actor, critic, obs):
    """−mean Q1 of the actor's actions on obs (B, D)."""
    q1, _ = learner.critic_net.apply(critic, obs, learner.actor_net.apply(actor, obs))
    return -jnp.mean(q1)


def critic_update(learner: Learner, agent: AgentState, key):
    """One Adam step of the twin critic. Returns (agent, (loss, mean Q1))."""
    batch_key, noise_key = jax.random.split(key)
    batch = replay.sample(agent.buffer, batch_key, learner.batch_size)
    (loss, q_mean), grads = jax.value_and_grad(
        functools.partial(critic_loss, learner), has_aux=True)(agent.critic, agent, batch,
                                                               noise_key)
    updates, critic_opt = learner.critic_optimizer.update(grads, agent.critic_opt, agent.critic)
    critic = optax.apply_updates(agent.critic, updates)
    return agent.replace(critic=critic, critic_opt=critic_opt,
                         updates=agent.updates + 1), (loss, q_mean)


def actor_update(learner: Learner, agent: AgentState) -> AgentState:
    """The delayed policy update and the soft target updates (TD3)."""
    key, batch_key = jax.random.split(agent.key)
    obs = replay.sample(agent.buffer, batch_key, learner.batch_size).obs
    grads = jax.grad(functools.partial(actor_loss, learner))(agent.actor, agent.critic, obs)
    updates, actor_opt = learner.actor_optimizer.update(grads, agent.actor_opt, agent.actor)
    actor = optax.apply_updates(agent.actor, updates)
    return agent.replace(
        actor=actor, actor_opt=actor_opt, key=key,
        target_actor=optax.incremental_update(actor, agent.target_actor, learner.tau),
        target_critic=optax.incremental_update(agent.critic, agent.target_critic, learner.tau))


def env_step(learner: Learner, agent: AgentState, env_params):
    """One noisy action in each env copy, stored; then one critic update
    (kept once past the warm-up). Returns (agent, (critic loss, mean Q1))."""
    env, num_envs = learner.env, learner.num_envs
    key, noise_key, random_key, env_key, update_key = jax.random.split(agent.key, 5)
    action = learner.actor_net.apply(agent.actor, agent.obs)
    noise = learner.exploration_noise * jax.random.normal(noise_key, action.shape)
    action = jnp.clip(action + noise, -1.0, 1.0)
    warmup = agent.step * num_envs < learner.learning_starts
    if learner.random_warmup:
        action = jnp.where(warmup, policies.random_action(env, random_key, (num_envs,)), action)
    batched = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_envs,)), env_params)
    obs, env_state, reward, _, info = jax.vmap(env.step)(
        jax.random.split(env_key, num_envs), agent.env_state, action, batched)
    buffer = replay.add(agent.buffer, agent.obs, action, reward, info["final_observation"],
                        info["terminated"].astype(jnp.float32))
    agent = agent.replace(buffer=buffer, env_state=env_state, obs=obs.astype(jnp.float32),
                          key=key, step=agent.step + 1)
    updated, metrics = critic_update(learner, agent, update_key)
    return _keep_if(jnp.logical_not(warmup), updated, agent), metrics


def train_block(learner: Learner, agent: AgentState, env_params):
    """`policy_delay` env steps, each with a critic update, then one actor
    and target update: TD3's delay as a static structure, so that no actor
    gradient is computed and discarded. Returns (agent, (critic loss, mean Q1))."""
    agent, (loss, q_mean) = jax.lax.scan(
        lambda a, _: env_step(learner, a, env_params), agent, None, length=learner.policy_delay)
    learning = agent.step * learner.num_envs > learner.learning_starts
    agent = _keep_if(learning, actor_update(learner, agent), agent)
    return agent, (jnp.mean(loss), jnp.mean(q_mean))


# ---------------------------------------------------------------------------
# The compiled programs of K agents and the outer loop


def compile_programs(learner: Learner, env_params, num_agents: int, eval_every: int):
    """(init_all(key, actor, critic) -> K stacked AgentStates (new networks
    when actor is None), run_chunk(agents) -> (agents, (K,) critic loss, (K,)
    mean Q1)): `eval_every` vmapped env steps in one jitted scan, the agents
    donated."""

    @jax.jit
    def init_all(key, actor, critic):
        keys = jax.random.split(key, num_agents)
        init = functools.partial(init_agent, learner)
        if actor is None:
            return jax.vmap(init)(keys, env_params)
        return jax.vmap(init)(keys, env_params, actor, critic)

    @functools.partial(jax.jit, donate_argnums=0)
    def run_chunk(agents):
        def body(agents, _):
            return jax.vmap(functools.partial(train_block, learner))(agents, env_params)
        agents, (loss, q_mean) = jax.lax.scan(body, agents, None,
                                              length=eval_every // learner.policy_delay)
        return agents, jnp.mean(loss, axis=0), jnp.mean(q_mean, axis=0)

    return init_all, run_chunk


def _initial_best(agents: AgentState, init_best) -> tuple[Any, np.ndarray]:
    """(stacked actors, (K,) returns) to beat: `init_best`, else the initial
    actors at −inf."""
    if init_best is not None:
        return (jax.tree.map(jnp.asarray, init_best[0]),
                np.asarray(init_best[1], np.float64).copy())
    return jax.tree.map(jnp.copy, agents.actor), np.full(agents.step.shape[0], -np.inf)


def _training_loop(env, covariates, key, init_all, run_chunk, *, init_state, init_best,
                   num_chunks, eval_every, eval_episodes, max_seconds, stop_returns, progress_fn,
                   checkpoint_fn):
    """Starts the agents (from `init_state` if given), runs the chunks,
    evaluating after each, keeping every agent's best actor and checkpointing
    improvements; stops early on `max_seconds` or `stop_returns`. Returns
    (best_actors, best_returns (K,), history)."""
    init_key, eval_key = jax.random.split(key)
    agents = init_all(init_key, *((init_state["actor"], init_state["critic"]) if init_state
                                  else (None, None)))
    best_params, best_returns = _initial_best(agents, init_best)   # run_chunk donates agents
    history = []
    start = time.time()
    for chunk in range(num_chunks):
        agents, loss, q_mean = run_chunk(agents)
        eval_key, sub = jax.random.split(eval_key)
        returns = policies.evaluate(env, agents.actor, covariates, sub,
                                    num_episodes=eval_episodes).mean(axis=1)
        improved = returns > best_returns
        best_returns = np.where(improved, returns, best_returns)
        best_params = policies.select(improved, agents.actor, best_params)
        record = {
            "step": (chunk + 1) * eval_every,
            "returns": returns.tolist(),
            "best_returns": best_returns.tolist(),
            "critic_loss": np.asarray(loss).tolist(),
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
      env: a continuous-action environment.
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
      learning_starts: transitions per agent with uniformly random actions first.
      eval_every: vectorised steps between evaluations.
      eval_episodes: deterministic episodes per agent at each evaluation.
      init_state: stacked `actor`, `critic` params to start from (targets
        equal to them; the empty buffer fills with the actor's noisy actions).
      init_best: (stacked actors, (K,) returns) to beat. max_seconds: stop
        after the first evaluation past this budget. stop_returns: (K,)
        returns at which to stop, once every agent reached its own.
      progress_fn: progress_fn(step, metrics) after each evaluation; metrics:
        `returns`, `best_returns`, `critic_loss`, `q_mean` (K,), `elapsed_s`.
      checkpoint_fn: checkpoint_fn(best_actors, best_returns, {"actor",
        "critic"}) after each evaluation that improved an agent.

    Returns:
      (best_actors, best_returns, history): actor params stacked over K, the
      best evaluated of each agent; (K,) their mean evaluation returns; the
      metrics dicts passed to progress_fn.
    """
    covariates = _validate(env, covariates, dict(
        num_timesteps=num_timesteps, num_envs=num_envs, batch_size=batch_size,
        buffer_size=buffer_size, policy_delay=policy_delay, eval_every=eval_every,
        eval_episodes=eval_episodes))
    learner = Learner(
        env=env, actor_net=policies.Actor(action_dim=env.action_dim, hidden=tuple(hidden)),
        critic_net=policies.Critic(hidden=tuple(hidden)),
        actor_optimizer=optax.adam(actor_learning_rate),
        critic_optimizer=optax.adam(critic_learning_rate), num_envs=num_envs,
        buffer_size=buffer_size, batch_size=batch_size, discount=discount, tau=tau,
        exploration_noise=exploration_noise, policy_noise=policy_noise, noise_clip=noise_clip,
        policy_delay=policy_delay, learning_starts=learning_starts,
        random_warmup=init_state is None)
    env_params = env.covariates_to_params(jnp.asarray(covariates))
    init_all, run_chunk = compile_programs(learner, env_params, covariates.shape[0], eval_every)
    return _training_loop(env, covariates, key, init_all, run_chunk, init_state=init_state,
                          init_best=init_best, num_chunks=-(-num_timesteps // eval_every),
                          eval_every=eval_every, eval_episodes=eval_episodes,
                          max_seconds=max_seconds, stop_returns=stop_returns,
                          progress_fn=progress_fn, checkpoint_fn=checkpoint_fn)
