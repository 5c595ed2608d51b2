"""Vanilla and PE-TS CaDM, the paper's model-based baselines (appendix D.2), in JAX.

Context-aware dynamics models (Lee et al. 2020) as the authors' TensorFlow
code does them (younggyoseo/CaDM @38c11a5; shared/reference/baselines.md §1):
no agent id, no covariates; a model adapts to an agent through a context
c ∈ R^10 encoded from the agent's K = 10 latest real transitions.

  * context encoder g (one per member): (Δs_{t-K} … Δs_{t-1}, a_{t-K} …
    a_{t-1}), oldest first, raw Δs and one-hot (discrete) or raw actions,
    zero slots before the K-th step -> 256 -> 128 -> 64 (ReLU) -> 10;
  * forward model: (z-scored s, action, c) -> 4 × 200 swish -> mean and
    log-variance of the z-scored Δ = s' - s; backward model (loss only): (z-scored
    s', action, c) -> the same -> s - s';
  * loss: mean squared error (Vanilla) or the Gaussian NLL with soft-bounded
    log-variance (PE), + 0.5 × the backward model's squared error,
    + Σ_l λ_l ½‖W_l‖² (λ 2.5e-5, 5e-5, 7.5e-5, … per layer, 1e-4 for the
    heads); trained on (c_t, transition t + j) for j < F = 10: every
    transition is predicted from the contexts of the 10 anchors before it
    (one step each, teacher-forced);
  * Vanilla: one member, deterministic; PE-TS: 5 bootstrapped members with
    Gaussian heads and 20 particles, each kept on one member (TS-∞), a new
    Gaussian draw each step.

The package: `model` (config, networks, losses, the training pairs), `train`
(`fit`: one jitted program per epoch, CaDM's stop rule, resumable), `dynamics`
(the model as a contextual dynamics at evaluation), `method` (`VanillaCaDM`,
`PETSCaDM`: how the harness builds, trains and plans them).

    from persim_jax.methods import cadm
    method = cadm.VanillaCaDM()                     # cadm.PETSCaDM(): PE-TS
    trained = method.train(transitions, method.key("train", seed=0))
    model = method.dynamics_for_agent(trained, agent_ids=[0, 1, 2, 3, 4])

At evaluation the model is a `evaluation.ContextualDynamics`: the episode
loop pushes each real transition into the context history (`observe`), and
plans on `dynamics(context)`, whose context stays fixed over the horizon.

Where we differ from the authors' code, and why (docs/design.md):
  * all 500 trajectories are the buffer from iteration 0, and each of the
    paper's 100 iterations is one fit (≤ 5 epochs) on it: our data is
    offline, there is nothing to collect between iterations;
  * anchor 0 of a trajectory (empty history) is trained on; theirs is masked;
  * each member plans with its own context (their tiling pairs particles
    with other members' contexts), and CEM contexts are not re-transposed;
  * HalfCheetah keeps our observation as it is (their env drops x-velocity
    and takes sin/cos of one angle); continuous history actions are raw;
  * TS noise is a counter-based draw keyed by (episode step, particle,
    state, action): the planner's dynamics is a pure function, so the draw is
    a function of its inputs; this also keeps the planner's shared action
    prefixes exact.
"""

from persim_jax.methods.cadm.dynamics import CaDMDynamics, CaDMDynamicsForAgent, Context
from persim_jax.methods.cadm.method import CANDIDATES, PETSCaDM, VanillaCaDM
from persim_jax.methods.cadm.model import (
    FILE_FORMAT,
    PE_TS,
    VANILLA,
    CaDMConfig,
    CaDMModel,
    PairData,
    Stats,
    compute_stats,
    encode_actions,
    encode_context,
    flat_history,
    forward_heads,
    gather_history,
    history_index,
    init_params,
    member_loss,
    pair_data,
    pair_index,
    path_rows,
    total_loss,
)
from persim_jax.methods.cadm.train import epoch_program, fit, make_optimizer

__all__ = [
    "CANDIDATES", "CaDMConfig", "CaDMDynamics", "CaDMDynamicsForAgent", "CaDMModel", "Context",
    "FILE_FORMAT", "PE_TS", "PETSCaDM", "PairData", "Stats", "VANILLA", "VanillaCaDM",
    "compute_stats", "encode_actions", "encode_context", "epoch_program", "fit", "flat_history", "forward_heads",
    "gather_history", "history_index", "init_params", "make_optimizer", "member_loss",
    "pair_data", "pair_index", "path_rows", "total_loss",
]
