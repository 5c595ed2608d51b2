"""Markdown report of one experiment: our numbers beside the paper's.

`results` is the results.json dict written by `experiments.run` (keys env,
dataset, preset, seed, test_agents, covariate_names, prediction, reward,
dataset_stats, timing_s, config, and optionally validation and figures).
Sections whose key is absent or None are said to be skipped, not dropped
silently.

    from experiments import report
    text = report.render_report(results)          # Markdown string
    report.write_report(results, "runs/cartpole/pure/report.md")

`write_report` links only the figures (results["figures"], file names) that
exist beside the report, and writes the file atomically. The reproduction
record (`experiments.reproduce`) builds its tables from the same public
helpers (`method_row`, `mean_or_none`, `fixed_digits`, `markdown_table`,
`prediction_section`, `reward_section`, ...).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from experiments import paper
from persim_jax.data import atomic_write

DATASET_NAMES = {"pure": "Pure", "random": "Random", "pure_eps20": "Pure-ε-20",
                 "pure_eps40": "Pure-ε-40"}
DASH = "–"


def is_number(x) -> bool:
    """A finite int or float (not a bool, None or NaN)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fixed_digits(x, digits: int) -> str:
    """`x` with `digits` decimals, or a dash when it is not a finite number."""
    return f"{x:.{digits}f}" if is_number(x) else DASH


def _printed(x) -> str:
    """A paper value as transcribed (no padding: 194.2, 3.23, 7459)."""
    return f"{x:.6g}" if is_number(x) else DASH


def _at(values, i):
    if values is None or i >= len(values):
        return None
    return values[i]


def mean_or_none(values) -> float | None:
    """The mean of the finite numbers of `values`; None when there are none."""
    finite = [v for v in (values or []) if is_number(v)]
    return sum(finite) / len(finite) if finite else None


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table of string cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def agent_labels(results: dict, count: int) -> list[str]:
    """Column labels of the first `count` test agents ("g=0.0001", ...)."""
    agents = results.get("test_agents") or []
    names = results.get("covariate_names") or []
    labels = []
    for i in range(count):
        agent = _at(agents, i)
        if agent is None:
            labels.append(f"agent {i + 1}")
            continue
        parts = [f"{names[j]}={v:g}" if j < len(names) else f"{v:g}"
                 for j, v in enumerate(agent)]
        labels.append(", ".join(parts))
    return labels


def agent_count(results: dict) -> int:
    """How many test agents the results' tables have (5 when none says)."""
    counts = [len(results.get("test_agents") or [])]
    for section, keys in (("prediction", ("rmse",)), ("dataset_stats", ("test_agent_return",))):
        for key in keys:
            counts.append(len((results.get(section) or {}).get(key) or []))
    for method in ("persim", "true_env_mpc"):
        counts.append(len(((results.get("reward") or {}).get(method) or {}).get("mean") or []))
    return max(counts) or 5


def dataset_label(dataset: str) -> str:
    """How reports write a dataset's name ("Pure-ε-20", or the user's file)."""
    return DATASET_NAMES.get(dataset, f"`{dataset}` (own data)")


def _stats_section(results: dict, rows_paper: dict) -> str:
    ours, theirs = results.get("dataset_stats"), rows_paper.get("dataset_stats")
    lines = ["## Logged data (paper Table 8)", ""]
    if not ours and not theirs:
        return "\n".join(lines + ["Skipped: no dataset statistics for this data.", ""])
    n = agent_count(results)
    header = ["", *agent_labels(results, n), "mean return (all agents)", "mean length"]
    rows = []
    for label, stats, fmt in (("ours", ours, lambda x: fixed_digits(x, 1)), ("paper", theirs, _printed)):
        if not stats:
            rows.append([label, *([DASH] * (n + 2))])
            continue
        returns = stats.get("test_agent_return") or []
        rows.append([label, *(fmt(_at(returns, i)) for i in range(n)),
                     fmt(stats.get("mean_return")), fmt(stats.get("mean_length"))])
    return "\n".join(lines + [
        "Return of each test agent's logged trajectory; means over the whole population.", "",
        markdown_table(header, rows), ""])


def prediction_section(results: dict, rows_paper: dict) -> str:
    """The "Prediction error" section: RMSE (median R²) per method and test
    agent, ours beside the paper's (`rows_paper`: `paper.paper_rows`)."""
    ours = results.get("prediction")
    lines = ["## Prediction error: RMSE (median R²)", ""]
    if not ours:
        lines += ["Skipped: prediction error was not measured in this run.", ""]
        if not rows_paper.get("prediction"):
            return "\n".join(lines)
    n = agent_count(results)
    header = ["method", *agent_labels(results, n), "mean over agents"]

    def row(label, method, digits=3):
        rmse, r2 = method.get("rmse") or [], method.get("r2_median") or []
        cells = [f"{fixed_digits(_at(rmse, i), digits)} ({fixed_digits(_at(r2, i), digits)})"
                 for i in range(n)]
        return [label, *cells, f"{fixed_digits(mean_or_none(rmse), digits)} ({fixed_digits(mean_or_none(r2), digits)})"]

    rows = []
    for key, name in paper.METHOD_NAMES.items():
        mine = ours if key == "persim" else method_row(results, key, "prediction")
        if mine:
            rows.append(row(f"**{name} (ours)**" if key == "persim" else f"{name} (ours)", mine))
        if key in rows_paper.get("prediction", {}):
            rows.append(row(f"{name} (paper)", rows_paper["prediction"][key]))
    if ours:
        lines.insert(2, f"Horizon {ours.get('horizon', '?')} steps, "
                        f"{ours.get('trials', '?')} trial(s).\n")
    return "\n".join(lines + [markdown_table(header, rows), ""])


def reward_section(results: dict, rows_paper: dict) -> str:
    """The "Average reward" section: mean ± std per method and test agent,
    ours beside the paper's."""
    ours = results.get("reward")
    lines = ["## Average reward: mean ± std", ""]
    if not ours:
        lines += ["Skipped: rewards were not measured in this run.", ""]
        if not rows_paper.get("reward") and not rows_paper.get("true_env_mpc"):
            return "\n".join(lines)
    n = agent_count(results)
    header = ["method", *agent_labels(results, n), "mean over agents"]

    def row(label, method, fmt):
        means, stds = method.get("mean") or [], method.get("std") or []
        single = _one_return(method)          # one episode of one trial: no spread
        cells = [f"{fmt(_at(means, i))} ± {DASH if single else fmt(_at(stds, i))}"
                 for i in range(n)]
        return [label, *cells, fixed_digits(mean_or_none(means), 1)]

    ours_fmt = lambda x: fixed_digits(x, 1)  # noqa: E731
    if ours:
        policy = (results.get("config") or {}).get("policy_episodes")
        model_free = policy and any(method_row(results, m, "reward") for m in ("bcq_p", "bcq_a"))
        spread = (f" Our ± is the std over {ours['std_over']}"
                  + (" (of each trial's mean over its episodes)" if ours["std_over"] == "trials"
                     else " of the one trial") + " for every trained method; True env + MPC's "
                  "over its episodes. The paper's ± is the std over its 5 trials."
                  if ours.get("std_over") else "")
        single = " ± –: one episode of one trial, no spread." if _one_return(ours.get(
            "persim") or {}) else ""
        lines.insert(2, f"{ours.get('episodes', '?')} MPC episode(s) per test agent per trial"
                        + (f" ({policy} for the BCQ policies)" if model_free else "")
                        + f", {ours.get('trials', '?')} trial(s).{spread}{single}\n")
    paper_reward = {**rows_paper.get("reward", {}),
                    "true_env_mpc": rows_paper.get("true_env_mpc")}
    rows = []
    for key, name in paper.METHOD_NAMES.items():
        mine = (ours or {}).get(key) if key in ("persim", "true_env_mpc") else method_row(
            results, key, "reward")
        if mine:
            rows.append(row(f"**{name} (ours)**" if key == "persim" else f"{name} (ours)", mine,
                            ours_fmt))
        if paper_reward.get(key):
            rows.append(row(f"{name} (paper)", paper_reward[key], _printed))
    return "\n".join(lines + [markdown_table(header, rows), ""])


def _one_return(row: dict) -> bool:
    """A reward row whose returns are one episode of one trial per agent."""
    returns = row.get("returns")
    return bool(returns) and len(returns) == 1 and all(len(agent) == 1 for agent in returns[0])


def method_row(results: dict, method: str, section: str) -> dict | None:
    """Our `section` ("prediction" or "reward") row of `method`, if it ran."""
    return ((results.get("methods") or {}).get(method) or {}).get(section)


def _validation_section(results: dict) -> str:
    validation = results.get("validation")
    if not validation:
        return ""
    if "per_agent" in validation:
        return _personalisation_section(results)
    lines = ["## Validation", ""]
    per_agent = [v for v in validation.get("per_agent_rmse") or [] if is_number(v)]
    if per_agent:
        ordered = sorted(per_agent)
        median = ordered[len(ordered) // 2] if len(ordered) % 2 else (
            ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
        lines += ["One-step prediction RMSE (raw units) per agent on the held-out "
                  f"transitions, over {len(per_agent)} agents:", "",
                  markdown_table(["mean", "median", "min", "max"],
                         [[fixed_digits(mean_or_none(per_agent), 4), fixed_digits(median, 4),
                           fixed_digits(ordered[0], 4), fixed_digits(ordered[-1], 4)]]), ""]
    for key, value in validation.items():
        if key == "per_agent_rmse":
            continue
        if is_number(value):
            lines.append(f"- {key}: {value:.4g}")
        elif isinstance(value, str):
            lines.append(f"- {key}: {value}")
    return "\n".join(lines + [""])


MODEL_LABELS = {"persim": "**PerSim**", "population": "Population model",
                "no_change": "No change"}
# Own data with more agents than this: the per-agent table shows the agents
# PerSim helps most and least (results.json has every agent).
MAX_AGENT_ROWS = 40


def _personalisation_section(results: dict) -> str:
    """Own data: does personalisation help? (results["validation"], written by
    `experiments.personalisation.evaluate`)."""
    v = results["validation"]
    k = v.get("open_loop_steps", "k")
    verdict = v.get("personalisation") or {}
    lines = ["## Does personalisation help?", "", verdict.get("statement", ""), "",
             f"Held out: {v.get('split', '?')} ({v.get('held_out_transitions', '?')} "
             f"transitions; {v.get('open_loop_windows', '?')} start a {k}-step open-loop "
             f"window). The simulator this run saves is the one scored here.", ""]
    summary = v.get("summary") or {}
    lines += ["Mean over agents of each agent's error relative to the dimensions' spread "
              "(lower is better):", "",
              markdown_table(["model", "one-step", f"{k}-step open loop"],
                     [[MODEL_LABELS[m], fixed_digits((summary.get(m) or {}).get("one_step"), 4),
                       fixed_digits((summary.get(m) or {}).get("open_loop"), 4)]
                      for m in MODEL_LABELS]), ""]
    lines += _per_dimension_table(v, k) + _per_agent_table(v, k)
    return "\n".join(lines)


def _per_dimension_table(v: dict, k) -> list[str]:
    names, spread = v.get("state_names") or [], v.get("spread") or []
    per_dimension = v.get("per_dimension") or {}
    header = ["state", "spread"] + [f"{MODEL_LABELS[m]} {h}" for h in ("one-step", f"{k}-step")
                                    for m in MODEL_LABELS]
    rows = []
    for d, name in enumerate(names):
        cells = [f"`{name}`", _printed(_at(spread, d))]
        for horizon in ("one_step", "open_loop"):
            for model in MODEL_LABELS:
                errors = (per_dimension.get(model) or {}).get(horizon) or {}
                raw, relative = _at(errors.get("rmse"), d), _at(errors.get("relative"), d)
                cells.append(f"{_printed(raw)} ({fixed_digits(relative, 3)})")
        rows.append(cells)
    return ["Per state dimension, over every agent's held-out steps: RMSE in the dimension's "
            "units (relative to its spread, the standard deviation over the training "
            "transitions):", "", markdown_table(header, rows), ""]


def _per_agent_table(v: dict, k) -> list[str]:
    per_agent = v.get("per_agent") or {}
    comparison = ((v.get("personalisation") or {}).get("one_step") or {})
    ratio = comparison.get("ratio") or {}
    ids = sorted(per_agent, key=lambda a: (ratio.get(a) is None, ratio.get(a) or 0.0))
    note = "sorted by how much PerSim improves on the population model, most first"
    if len(ids) > MAX_AGENT_ROWS:
        half = MAX_AGENT_ROWS // 2
        note += (f"; the {half} agents it helps most and the {half} it helps least of "
                 f"{len(ids)} (all are in results.json)")
        ids = ids[:half] + ids[-half:]

    def relative(agent, model, horizon):
        return ((per_agent[agent].get(model) or {}).get(horizon) or {}).get("relative_rmse")

    def change(agent, horizon):
        persim, population = relative(agent, "persim", horizon), relative(agent, "population",
                                                                          horizon)
        if not (is_number(persim) and is_number(population)) or population == 0:
            return DASH
        return f"{100 * (persim / population - 1):+.0f} %"

    rows = [[f"`{agent}`", str(per_agent[agent].get("held_out_transitions", DASH)),
             *[fixed_digits(relative(agent, m, "one_step"), 3) for m in MODEL_LABELS],
             change(agent, "one_step"),
             *[fixed_digits(relative(agent, m, "open_loop"), 3) for m in MODEL_LABELS],
             change(agent, "open_loop")] for agent in ids]
    header = ["agent", "held-out steps", "PerSim 1-step", "population 1-step",
              "no change 1-step", "PerSim vs population", f"PerSim {k}-step",
              f"population {k}-step", f"no change {k}-step", "PerSim vs population"]
    return [f"Per agent, error relative to the dimensions' spread ({note}); each agent's "
            "errors per dimension, in raw units and relative, are in results.json "
            "(`validation.per_agent`, keyed by the agent's id):", "",
            markdown_table(header, rows), ""]


def _own_data_how_to_read(results: dict) -> str:
    k = (results.get("validation") or {}).get("open_loop_steps", "k")
    return "\n".join([
        "## How to read", "",
        "- **PerSim** is the personalised simulator: one network, each agent with its own "
        "latent factor. The **population model** is the same network trained with every "
        "agent's id set to the same value: a single model for everybody. **No change** "
        "predicts that the "
        "state stays as it is; a useful model beats it.",
        "- The models were trained on the first 80 % of each agent's trajectory and scored on "
        "the last 20 %, its future: the errors are what to expect when simulating an agent "
        "forward from its recent data.",
        "- **One-step** error: from each logged state and action, the next state. "
        f"**{k}-step open loop**: from a logged state, {k} steps ahead under the logged actions, "
        "each step from the model's own previous prediction (errors compound); RMSE over the "
        f"{k} predicted states, ensemble mean.",
        "- **Relative** errors divide each dimension's error by its spread (the standard "
        "deviation of that state column over the training data), so dimensions in different "
        "units count alike; 1.0 is an error as large as the whole spread of the dimension.",
        "- \"PerSim vs population\" is the change of PerSim's relative error against the "
        "population model's: negative means personalisation helped that agent.", ""])


def _own_data_header(results: dict) -> str:
    total = _total_seconds(results)
    dataset = str(results["dataset"])
    lines = [f"# PerSim on your data: `{os.path.basename(dataset)}` (own data)", "",
             f"dataset `{dataset}` · seed {results.get('seed', '?')} · total time "
             f"{fixed_digits(total, 1) + ' s' if total is not None else DASH}", ""]
    described = results.get("data")
    if described:
        ids = described.get("agent_ids") or []
        shown = ", ".join(f"`{i}`" for i in ids[:6]) + (", …" if len(ids) > 6 else "")
        covariates = described.get("covariate_names")
        lines += [f"Data: {described.get('agents')} agents ({shown}), "
                  f"{described.get('transitions')} transitions; states "
                  f"{', '.join(f'`{n}`' for n in described.get('state_names') or [])}; "
                  f"{described.get('actions')}; "
                  + (f"covariates {', '.join(f'`{n}`' for n in covariates)}." if covariates
                     else "no covariates."), ""]
    settings = _settings_line(results.get("config") or {})
    if settings:
        lines += [f"Settings: {settings}", ""]
    return "\n".join(lines)


def _own_data_figures(results: dict, figure_dir: str | None) -> str:
    text = _figures_section(results, figure_dir)
    described = results.get("data") or {}
    if described and not described.get("covariate_names"):
        prefix = ((described.get("loader") or {}).get("covariate_prefix")) or "cov_"
        hint = (f"No covariates in the data, so the t-SNE shows the agent factors alone. To "
                f"colour it by what you know about each agent (age, weight, ...), add columns "
                f"named `{prefix}<name>` holding one value per agent, repeated on each of its "
                f"rows (or pass --covariate_prefix).")
        text = (text or "## Figures\n\n") + hint + "\n"
    return text


def render_own_data_report(results: dict, figure_dir: str | None = None) -> str:
    """The Markdown report of an own-data run without an env: what was read,
    whether personalisation helps, figures and time; nothing of the paper's
    protocol (no planner, episodes or paper rows)."""
    parts = [_own_data_header(results), _validation_section(results)]
    if (results.get("validation") or {}).get("per_agent") is not None:
        parts.append(_own_data_how_to_read(results))
    parts += [_decisions_section(results), _own_data_figures(results, figure_dir),
              _timing_section(results)]
    return "\n".join(p for p in parts if p).rstrip() + "\n"


def _how_to_read(results: dict, has_paper: bool) -> str:
    preset = results.get("preset")
    text = [
        "## How to read",
        "",
        "- Our rows (**ours**) come from this run; the paper's (**paper**) are transcribed from "
        "its Tables 8-14.",
        "- **RMSE** is the root-mean-square error, in the state's raw units, of the simulator's "
        "open-loop prediction of the next states against the true ones, averaged over the test "
        "agent's episodes; lower is better. **Median R²** is the median over episodes of the "
        "variance-weighted R² of those predictions: 1 is perfect, 0 is no better than predicting "
        "the mean, negative is worse than that.",
        "- **Reward** is the return of model-predictive control planning through a learned "
        "model (PerSim, CaDM, the population and per-agent models) or through the true "
        "environment (True env + MPC, an upper reference), or of a model-free policy's "
        "episodes (BCQ-P, BCQ-A). CaDM plans with its own objective (the particles' mean of "
        "undiscounted returns, at most 200 candidates). The paper's ± is the standard "
        "deviation over 5 trials, each an independently seeded model training; ours says "
        "above what it is over (with one trial, that trial's episodes).",
        "- Columns are the test agents, labelled by their parameters; the last column averages "
        "over them.",
    ]
    evaluated = bool(results.get("prediction") or results.get("reward"))
    if not (evaluated or has_paper):
        text = text[:2] + ["- Only this run's own measurements are shown: the paper has no "
                           "numbers for this data, and no test agents were evaluated."]
    elif not has_paper:
        text.append("- The paper has no numbers for this data, so only our rows are shown.")
    if preset == "quick":
        text.append("- Our rows use the **quick** preset (fewer trials, episodes, epochs and "
                    "candidates than the paper; the baselines fewer iterations, CaDM fewer "
                    "pairs per epoch and PE-TS 5 particles), so they are indicative, not a "
                    "reproduction; run with `--preset=paper` for the paper's protocol.")
    return "\n".join(text + [""])


def _timing_section(results: dict) -> str:
    timing = results.get("timing_s") or {}
    if not timing:
        return ""
    rows = [[stage, fixed_digits(sec, 1)] for stage, sec in timing.items() if stage != "total"]
    rows.append(["**total**", fixed_digits(_total_seconds(results), 1)])
    return "\n".join(["## Time", "", markdown_table(["stage", "seconds"], rows), ""])


def _total_seconds(results: dict) -> float | None:
    timing = results.get("timing_s") or {}
    if is_number(timing.get("total")):
        return timing["total"]
    values = [v for v in timing.values() if is_number(v)]
    return sum(values) if values else None


def _figures_section(results: dict, figure_dir: str | None) -> str:
    names = list(results.get("figures") or [])
    if figure_dir is not None:
        names = [n for n in names if os.path.isfile(os.path.join(figure_dir, n))]
    if not names:
        return ""
    lines = ["## Figures", ""]
    for name in names:
        stem = os.path.splitext(os.path.basename(name))[0]
        if stem == "tsne_factors":
            title = "t-SNE of the agent factors"
        elif stem.startswith("tsne_"):
            title = f"t-SNE of the agent factors, coloured by {stem[len('tsne_'):]}"
        elif stem == "trajectories":
            title = "Predicted vs true state trajectories of test agents"
        else:
            title = stem
        lines += [f"![{title}]({name})", ""]
    return "\n".join(lines)


def _settings_line(config: dict) -> str:
    """key=value for the scalar settings; a nested dict shows its "kind" only."""
    parts = []
    for key, value in config.items():
        if value is None:
            continue
        if key == "method_settings":        # {method: {field: value}}
            parts += [f"{name}: " + " ".join(f"{k}={v}" for k, v in fields.items())
                      for name, fields in value.items()]
            continue
        if isinstance(value, dict):
            if value.get("kind"):
                parts.append(f"{key}={value['kind']}")
            continue
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def _decisions_section(results: dict) -> str:
    """Own data with --decide: the plan and policy values per agent."""
    from experiments import decisions

    return "\n".join(decisions.report_lines(results))


def render_report(results: dict, figure_dir: str | None = None) -> str:
    """The Markdown report of one results.json dict.

    Figures named in results["figures"] are linked by relative name; with
    `figure_dir`, only those that exist there.
    """
    if not results.get("dataset"):
        raise ValueError("results has no 'dataset': cannot render a report")
    env, dataset = results.get("env"), str(results["dataset"])
    if env is None:
        return render_own_data_report(results, figure_dir)
    rows_paper = paper.paper_rows(env, dataset)
    has_paper = bool(rows_paper["prediction"] or rows_paper["reward"])
    total = _total_seconds(results)

    header = [
        f"# PerSim on {paper.display_name(env) if env else 'own environment'} / "
        f"{dataset_label(dataset)}",
        "",
        f"env `{env or 'none (own data)'}` · dataset `{dataset}` · preset `{results.get('preset', '?')}` · "
        f"seed {results.get('seed', '?')} · total time "
        f"{fixed_digits(total, 1) + ' s' if total is not None else DASH}",
        "",
    ]
    settings = _settings_line(results.get("config") or {})
    if settings:
        header += [f"Settings: {settings}", ""]

    parts = [
        "\n".join(header),
        _stats_section(results, rows_paper),
        prediction_section(results, rows_paper),
        reward_section(results, rows_paper),
        _validation_section(results),
        _decisions_section(results),
        _how_to_read(results, has_paper),
        _figures_section(results, figure_dir),
        _timing_section(results),
    ]
    return "\n".join(p for p in parts if p).rstrip() + "\n"


def write_report(results: dict, path: str | os.PathLike) -> str:
    """Renders the report and writes it atomically to `path`; returns the path.
    Figures are linked only if they exist in the report's folder."""
    path = os.fspath(path)
    text = render_report(results, figure_dir=os.path.dirname(os.path.abspath(path)))
    with atomic_write(path, "wb") as handle:     # a new file's usual permissions
        handle.write(text.encode("utf-8"))
    return path
