"""Does personalisation help on the user's own data?

Each agent's trajectory is cut in time: the first 80 % train the models, the
last 20 % are held out (`persim_jax.data.time_ordered_split`), so the held-out
steps are the agent's future, not random steps between training ones. Three
predictors are scored on them, per agent and per state dimension:

  persim      the personalised simulator (its agent factor);
  population  the same network trained with every agent id set to 0, one
              model for everybody (`persim_jax.methods.Population`);
  no_change   ŝ_{t+1} = s_t, the floor any useful model must beat.

Two errors, each as an RMSE in the dimension's raw units and relative to the
dimension's spread (its standard deviation over the training transitions, so
that mg/dL and U/min are comparable):

  one-step    every held-out transition, from the logged state;
  open-loop   from every held-out step with k logged steps after it (same
              agent, each next state the following row's state), the model
              predicts k steps from its own predictions under the logged
              actions; RMSE over the k predicted states (the ensemble mean).

    validation = personalisation.evaluate(
        {"persim": simulator, "population": population}, transitions,
        held_out_index, spread, open_loop_steps=10)
    validation["personalisation"]["statement"]     # one paragraph, plain words

The errors are computed by one jitted program per model and horizon
(`lax.scan` over the k steps inside `Simulator.rollout`, vmapped over the
windows and the ensemble), summed per agent with `segment_sum`.
"""

from __future__ import annotations

import functools
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from persim_jax.data import Transitions
from persim_jax.persim.simulator import Simulator

HELD_OUT_FRACTION = 0.2
DEFAULT_OPEN_LOOP_STEPS = 10
# PerSim counts as better (worse) for an agent when its relative error is at
# least this share below (above) the population model's.
MARGIN = 0.05
MODELS = ("persim", "population", "no_change")
# Windows scored per call of the compiled program (memory: M × k × C × D floats).
CHUNK = 4096


def open_loop_windows(transitions: Transitions, held_out: np.ndarray,
                      steps: int) -> np.ndarray:
    """(W,) the held-out transitions that start `steps` consecutive held-out
    transitions of one agent, each next state the following one's state
    (so that an open-loop prediction can be compared with what was logged).

    Args:
      transitions: all T transitions, each agent's in time order.
      held_out: (H,) sorted indices of the held-out transitions.
      steps: k >= 1.
    """
    t = transitions.num_transitions
    is_held = np.zeros(t, bool)
    is_held[held_out] = True
    agent = np.asarray(transitions.agent_id)
    obs, next_obs = np.asarray(transitions.obs), np.asarray(transitions.next_obs)
    # link[j]: transition j + 1 continues transition j.
    link = (is_held[:-1] & is_held[1:] & (agent[:-1] == agent[1:])
            & np.all(next_obs[:-1] == obs[1:], axis=1))
    linked = np.concatenate([[0], np.cumsum(link)])                   # (T,)
    starts = np.arange(max(t - steps + 1, 0))
    whole = linked[starts + steps - 1] - linked[starts] == steps - 1
    return starts[is_held[starts] & whole]


@functools.partial(jax.jit, static_argnames=("num_agents", "pooled"))
def _squared_errors(simulator: Simulator | None, agent_id, obs0, actions, targets, weight,
                    num_agents: int, pooled: bool):
    """Per-agent sums of squared open-loop errors of one chunk of windows.

    Args:
      simulator: the model, or None for "no change".
      agent_id: (C,) agent index of each window.
      obs0: (C, D) logged start states.
      actions: (k, C) int or (k, C, A) float logged actions.
      targets: (k, C, D) logged next states.
      weight: (C,) 1 for a real window, 0 for padding.
      pooled: the model is the population's (every agent is its agent 0).

    Returns:
      (N, D) sums over windows and steps of the squared error of the
      ensemble-mean prediction.
    """
    if simulator is None:
        predicted = jnp.broadcast_to(obs0, targets.shape)
    else:
        ids = jnp.zeros_like(agent_id) if pooled else agent_id
        predicted = simulator.rollout(ids, obs0, actions).mean(axis=0)     # (k, C, D)
    squared = ((predicted - targets) ** 2).sum(axis=0) * weight[:, None]   # (C, D)
    return jax.ops.segment_sum(squared, agent_id, num_segments=num_agents)


def _errors(model: Simulator | None, pooled: bool, transitions: Transitions,
            starts: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """((N, D) sums of squared errors, (N,) number of predicted states) of
    `model` over the windows starting at `starts` (k = `steps`)."""
    n, d = transitions.num_agents, transitions.obs_dim
    sums = np.zeros((n, d))
    counts = np.bincount(np.asarray(transitions.agent_id)[starts], minlength=n) * steps
    if not starts.size:
        return sums, counts
    chunk = min(CHUNK, 1 << int(math.ceil(math.log2(starts.size))))
    padded = np.concatenate([starts, np.full(-starts.size % chunk, starts[0])])
    weight = (np.arange(padded.size) < starts.size).astype(np.float32)
    index = padded[:, None] + np.arange(steps)                              # (W', k)
    agent = np.asarray(transitions.agent_id)
    obs, next_obs = np.asarray(transitions.obs), np.asarray(transitions.next_obs)
    action = np.asarray(transitions.action)
    for begin in range(0, padded.size, chunk):   # a few chunks, one compiled program
        rows = index[begin:begin + chunk]
        sums += np.asarray(_squared_errors(
            model, agent[rows[:, 0]], obs[rows[:, 0]], np.swapaxes(action[rows], 0, 1),
            np.swapaxes(next_obs[rows], 0, 1), weight[begin:begin + chunk],
            num_agents=n, pooled=pooled), np.float64)
    return sums, counts


def _finite_or_none(values):
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, np.float64).ravel()]


def _relative_rmse(rmse: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """(..., D) RMSE -> (...) RMSE of the errors divided by each dimension's
    spread (dimensions with no spread left out); NaN where undefined."""
    usable = spread > 0
    if not usable.any():
        return np.full(rmse.shape[:-1], np.nan)
    return np.sqrt(np.mean((rmse[..., usable] / spread[usable]) ** 2, axis=-1))


def _scores(predictors, transitions, windows, steps, spread, ids, per_agent):
    """(per_dimension, summary, relative_by_agent) of every predictor and
    horizon; fills `per_agent`'s rows in place."""
    per_dimension, summary, relative_by_agent = {}, {}, {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for name, (model, pooled) in predictors.items():
            per_dimension[name], summary[name] = {}, {}
            for horizon in ("one_step", "open_loop"):
                sums, counts = _errors(model, pooled, transitions, windows[horizon],
                                       steps[horizon])
                rmse = np.sqrt(sums / counts[:, None])                          # (N, D)
                relative = rmse / np.where(spread > 0, spread, np.nan)
                agent_relative = _relative_rmse(rmse, spread)                   # (N,)
                relative_by_agent[name, horizon] = agent_relative
                for i, key in enumerate(ids):
                    per_agent[key].setdefault(name, {})[horizon] = {
                        "rmse": _finite_or_none(rmse[i]),
                        "relative": _finite_or_none(relative[i]),
                        "relative_rmse": _finite_or_none(agent_relative[i])[0]}
                pooled_rmse = np.sqrt(sums.sum(0) / counts.sum())                # (D,)
                per_dimension[name][horizon] = {
                    "rmse": _finite_or_none(pooled_rmse),
                    "relative": _finite_or_none(pooled_rmse / np.where(spread > 0, spread,
                                                                       np.nan))}
                finite = agent_relative[np.isfinite(agent_relative)]
                summary[name][horizon] = float(finite.mean()) if finite.size else None
    return per_dimension, summary, relative_by_agent


def evaluate(models: Mapping[str, Simulator], transitions: Transitions, held_out: np.ndarray,
             spread, *, open_loop_steps: int = DEFAULT_OPEN_LOOP_STEPS) -> dict:
    """The personalisation report's numbers (results.json "validation").

    Args:
      models: {"persim": Simulator, "population": Simulator} (the population
        model trained on the pooled data, one agent).
      transitions: all T transitions (training and held out), agent ids as
        the PerSim simulator's.
      held_out: (H,) indices of the held-out transitions
        (`data.time_ordered_split`).
      spread: (D,) standard deviation of each state dimension over the
        training transitions.
      open_loop_steps: k of the open-loop error.

    Returns:
      {"split", "held_out_fraction", "held_out_transitions",
      "open_loop_steps", "open_loop_windows", "state_names", "spread",
      "summary" {model: {one_step, open_loop}}, "per_dimension" {model:
      {one_step, open_loop: {rmse (D), relative (D)}}}, "per_agent" {id:
      {held_out_transitions, open_loop_windows, model: {one_step, open_loop:
      {rmse (D), relative (D), relative_rmse}}}}, "personalisation"
      {verdict, statement, one_step, open_loop}}; None for an undefined
      number (an agent with no window, a dimension with no spread).
    """
    spread = np.asarray(spread, np.float64)
    held_out = np.asarray(held_out)
    keys = transitions.agent_keys or tuple(range(transitions.num_agents))
    ids = [str(k) for k in keys]
    names = list(transitions.state_names or
                 [f"state_{j}" for j in range(transitions.obs_dim)])
    windows = {"one_step": held_out,
               "open_loop": open_loop_windows(transitions, held_out, open_loop_steps)}
    steps = {"one_step": 1, "open_loop": open_loop_steps}
    predictors = {"persim": (models["persim"], False), "population": (models["population"], True),
                  "no_change": (None, False)}
    per_agent = {key: {"held_out_transitions": int(count), "open_loop_windows": int(w)}
                 for key, count, w in zip(
                     ids, np.bincount(np.asarray(transitions.agent_id)[held_out],
                                      minlength=len(ids)),
                     np.bincount(np.asarray(transitions.agent_id)[windows["open_loop"]],
                                 minlength=len(ids)))}
    per_dimension, summary, relative_by_agent = _scores(predictors, transitions, windows, steps,
                                                        spread, ids, per_agent)
    return {
        "split": (f"time-ordered: the last {100 * HELD_OUT_FRACTION:.0f} % of each agent's "
                  f"trajectory held out, the first {100 * (1 - HELD_OUT_FRACTION):.0f} % "
                  f"trained on"),
        "held_out_fraction": HELD_OUT_FRACTION,
        "held_out_transitions": int(held_out.size),
        "open_loop_steps": int(open_loop_steps),
        "open_loop_windows": int(windows["open_loop"].size),
        "state_names": names,
        "spread": _finite_or_none(spread),
        "models": list(MODELS),
        "summary": summary,
        "per_dimension": per_dimension,
        "per_agent": per_agent,
        "personalisation": verdict(relative_by_agent, ids, open_loop_steps),
    }


def _comparison(persim: np.ndarray, population: np.ndarray, no_change: np.ndarray,
                ids: list[str]) -> dict | None:
    """PerSim vs the population model on one horizon, from (N,) relative
    RMSEs: the mean of each, the relative change, and which agents PerSim
    predicts better / worse / about as well (within MARGIN)."""
    both = np.isfinite(persim) & np.isfinite(population)
    if not both.any():
        return None
    ratio = np.full(persim.shape, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio[both] = persim[both] / population[both]
    order = np.argsort(np.where(both, ratio, np.inf), kind="stable")      # best first
    better = [ids[i] for i in order if both[i] and ratio[i] <= 1 - MARGIN]
    worse = [ids[i] for i in order[::-1] if both[i] and ratio[i] >= 1 + MARGIN]
    same = [ids[i] for i in order if both[i] and 1 - MARGIN < ratio[i] < 1 + MARGIN]
    mean_persim, mean_population = float(persim[both].mean()), float(population[both].mean())
    no_change_both = np.isfinite(no_change) & both
    return {
        "agents": int(both.sum()),
        "persim": mean_persim, "population": mean_population,
        "no_change": float(no_change[no_change_both].mean()) if no_change_both.any() else None,
        "change": mean_persim / mean_population - 1 if mean_population > 0 else None,
        "ratio": {ids[i]: float(ratio[i]) for i in range(len(ids)) if both[i]},
        "better": better, "worse": worse, "same": same,
        "persim_not_better_than_no_change": [
            ids[i] for i in range(len(ids))
            if no_change_both[i] and persim[i] >= no_change[i]],
    }


def _label(comparison: dict | None) -> str | None:
    if comparison is None or comparison["change"] is None:
        return None
    if comparison["change"] <= -MARGIN:
        return "better"
    if comparison["change"] >= MARGIN:
        return "worse"
    return "same"


def _names(ids: list[str], ratios: dict, limit: int = 8) -> str:
    shown = [f"{key} ({100 * (ratios[key] - 1):+.0f} %)" for key in ids[:limit]]
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(shown) + more


def verdict(relative_by_agent: Mapping, ids: list[str], open_loop_steps: int) -> dict:
    """Whether personalisation helped, and for whom, in plain words.

    Args:
      relative_by_agent: {(model, horizon): (N,) relative RMSE per agent}.
      ids: the N agents' ids as the user wrote them.
      open_loop_steps: k, for the wording.

    Returns:
      {"verdict": "helped" | "did not help" | "no clear difference" |
      "mixed" | "unknown", "statement": text, "one_step": comparison,
      "open_loop": comparison} (see `_comparison`).
    """
    comparisons = {h: _comparison(relative_by_agent["persim", h],
                                  relative_by_agent["population", h],
                                  relative_by_agent["no_change", h], ids)
                   for h in ("one_step", "open_loop")}
    labels = {h: _label(c) for h, c in comparisons.items()}
    known = {label for label in labels.values() if label is not None}
    kind = ("unknown" if not known else "helped" if known == {"better"} else
            "did not help" if known == {"worse"} else
            "no clear difference" if known == {"same"} else "mixed")
    headline = {
        "helped": "**Personalisation helped.**",
        "did not help": "**Personalisation did not help**: one model for everybody predicted "
                        "better.",
        "no clear difference": "**Personalisation made no clear difference** (within "
                               f"{100 * MARGIN:.0f} %).",
        "mixed": "**Personalisation helped on one horizon and not on the other.**",
        "unknown": "**Not enough held-out data to tell whether personalisation helps.**",
    }[kind]
    sentences = [headline]
    wording = {"one_step": "one-step error",
               "open_loop": f"{open_loop_steps}-step open-loop error"}
    for horizon, c in comparisons.items():
        if c is None:
            if horizon == "open_loop":
                sentences.append(f"No agent has {open_loop_steps} consecutive held-out steps, "
                                 f"so there is no open-loop error (lower --open_loop_steps).")
            continue
        direction = "lower" if c["change"] < 0 else "higher"
        sentences.append(
            f"On the held-out {wording[horizon]}, PerSim's is {abs(100 * c['change']):.0f} % "
            f"{direction} than the population model's (mean over {c['agents']} agents of the "
            f"error relative to each dimension's spread: {c['persim']:.3g} vs "
            f"{c['population']:.3g}; no change: {_fmt(c['no_change'])}). PerSim is better by "
            f"more than {100 * MARGIN:.0f} % for {len(c['better'])} agent(s), worse for "
            f"{len(c['worse'])}, about the same for {len(c['same'])}.")
    main = comparisons["one_step"] or comparisons["open_loop"]
    if main is not None and main["no_change"] is not None and (
            main["persim"] >= main["no_change"]):
        sentences.append(
            f"But on average PerSim predicts no better than assuming nothing changes "
            f"({main['persim']:.3g} vs {main['no_change']:.3g}): neither simulator is useful "
            f"yet; train longer (--epochs), or check that the states carry what drives them.")
    if main is not None:
        if main["better"]:
            sentences.append(f"It helped most for: {_names(main['better'], main['ratio'])}.")
        if main["worse"]:
            sentences.append(f"It did not help for: {_names(main['worse'], main['ratio'])}.")
        stuck = main["persim_not_better_than_no_change"]
        if stuck:
            sentences.append(f"For {len(stuck)} agent(s) PerSim is no better than predicting "
                             f"that nothing changes: {', '.join(stuck[:8])}"
                             f"{' ...' if len(stuck) > 8 else ''}.")
    return {"verdict": kind, "statement": " ".join(sentences), **comparisons}


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3g}"
