"""BCQ-P and BCQ-A, the paper's model-free baselines (appendix D.2), in JAX.

The package: `model` (config, networks, losses, updates), `train` (the
policies and `fit`), `method` (`BCQP`, `BCQA`: how the harness builds and
trains them).

Batch-Constrained deep Q-learning (Fujimoto et al. 2019) as the authors'
PyTorch code does it (sfujim/BCQ @4876f7e; shared/reference/baselines.md §2).
Every layer is initialised like torch.nn.Linear, U(±1/√fan_in) for weights and
biases (`persim_jax.networks.MLP`); not_done = 1 - `Transitions.done`, 0 only at a
true termination (time-limit ends keep 1).

Discrete (MountainCar, CartPole): Q and an imitation net G, two independent
MLPs (256, 256) on the raw states. An action may be chosen when G(a|s) /
max G(·|s) > threshold (strict; 0.3). Target: a* = the masked argmax of the
ONLINE Q and G at s', y = r + γ · not_done · Q_target(s', a*). Loss: Huber
(δ = 1) + NLL(a | G) + 0.01 · mean(logits²); one Adam (3e-4) for both, batch
64, Polyak 0.005 every step. Acting: the greedy masked argmax (ε = 0).

Continuous (HalfCheetah; box [-max_action, max_action]): a VAE (750, 750;
latent 2·A; log σ clamped to [-4, 15]; decoder max_a · tanh; free samples
z ~ N(0, I) clipped to ±0.5), an actor a' = clip(a + Φ · max_a · tanh(ξ(s,
a)), ±max_a), Φ = 0.05 (400, 300), two critics (400, 300). A step: (1) VAE,
MSE + 0.5 · KL; (2) critics: s' repeated 10×, actions from the online VAE
perturbed by the target actor, q = λ · min(Q1', Q2') + (1 - λ) · max (λ =
0.75), max over the copies, y = r + not_done · γ · q, MSE(Q1, y) + MSE(Q2, y);
(3) actor: maximise mean Q1(s, ξ(s, dec(s))); (4) Polyak on the critics' and
the actor's targets. Three Adams (1e-3), batch 100. Acting: 100 decoded,
perturbed samples, the argmax of Q1.

BCQ-P: one policy on all transitions. BCQ-A: one per evaluated agent, on that
agent's trajectory only. Training is one jitted program per chunk of
iterations: a `lax.scan` over iterations, vmapped over the K policies, each
drawing minibatches uniformly with replacement from its own rows of a padded
(K, T_max, ...) array. Python loops over chunks only (`persim_jax.training.run_loop`:
progress, resumable orbax checkpoints). Iteration i of the policy of agent a uses
fold_in(fold_in(key, a), i): results depend neither on the chunk size nor on
the other agents trained beside it.

    method = bcq.BCQA(bcq.BCQConfig(iterations=550_000))
    trained = method.train(transitions, method.key("train", 0), agent_ids=[0, 1, 2, 3, 4])
    returns = evaluation.run_policy_episodes(
        key, method.policy_for_agent(trained, [0, 1, 2, 3, 4]), env, env.test_agents, 100)

Where we differ from the authors' code, and why:
  * the VAE's μ and log σ heads are one Linear(750, 2 · latent), split: the
    same function and the same initial distribution;
  * the discrete target net holds Q only (the authors' copy of G is never read);
  * threshold < 1: at 1 the strict ">" masks every action and the argmax
    silently returns action 0 (baselines.md §3);
  * continuous actions must lie in the box (the decoder cannot produce others).
"""

from persim_jax.methods.bcq.method import BCQA, BCQP
from persim_jax.methods.bcq.model import (
    LATENT_CLIP,
    LOG_STD_RANGE,
    MASKED_VALUE,
    BCQConfig,
    Batch,
    ContinuousState,
    DiscreteState,
    continuous_update,
    critic_target,
    critic_values,
    decode,
    discrete_update,
    init_continuous,
    init_discrete,
    masked_q,
    perturb,
)
from persim_jax.methods.bcq.train import (
    CHUNK_ITERATIONS,
    FILE_FORMAT,
    BCQPolicies,
    BCQPolicyForAgent,
    ContinuousPolicy,
    DiscretePolicy,
    PolicyData,
    fit,
    make_chunk_fn,
    policy_data,
)

__all__ = [
    "BCQA", "BCQConfig", "BCQP", "BCQPolicies", "BCQPolicyForAgent", "Batch", "CHUNK_ITERATIONS",
    "ContinuousPolicy", "ContinuousState", "DiscretePolicy", "DiscreteState", "FILE_FORMAT",
    "LATENT_CLIP", "LOG_STD_RANGE", "MASKED_VALUE", "PolicyData", "continuous_update",
    "critic_target", "critic_values", "decode", "discrete_update", "fit", "init_continuous",
    "init_discrete", "make_chunk_fn", "masked_q", "perturb", "policy_data",
]
