"""The paper's comparative claims, checked with their noise on a cell's
numbers, and the measured notes about the cells that depart from the paper.

    from experiments import claims
    notes = claims.load_notes()                    # experiments/results/notes.json
    for claim in claims.CLAIMS:
        claim.verdict(results)                     # Verdict(outcome, interval) or None
        claim.paper_verdict(env, dataset)          # the same check on the paper's numbers
    claims.claim_notes(results, claims.CLAIMS[4], notes)
    claims.departures(results, notes)

`results` is a cell's `results.json` dict (`experiments.run`); each claim
names the methods it compares, the section it reads and the direction that
makes it hold. A verdict is "holds" (the whole 95 % interval of the
difference lies on the claimed side), "fails" (all of it on the other side)
or "inconclusive" (the interval covers the boundary, or nothing measured the
noise); the intervals are `experiments.intervals`' (rewards: a bootstrap of
the recorded episode returns over trials and episodes; prediction errors: a
normal interval from each agent's mean and std over episodes).

The notes are data beside the record (`experiments/results/notes.json`),
keyed by (method or claim id, env, dataset[, preset]). Each names the
committed measurement file it rests on and the command that reproduces it,
says whether it is a measurement or a hypothesis, and takes every number it
quotes from a JSON path in a committed file (`{name}` placeholders, `values`);
a note whose file is missing or whose placeholder does not resolve is refused
when the notes are loaded. `experiments.reproduce` renders both into each
preset's REPORT.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import string
from typing import NamedTuple

import numpy as np

from experiments import intervals, paper, report
from experiments.datagen.datasets import DATASETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTES_PATH = os.path.join(ROOT, "experiments", "results", "notes.json")
ALL_ENVS = ("mountaincar", "cartpole", "halfcheetah")
ALL_METHODS = tuple(paper.METHOD_NAMES)
PRESETS = ("quick", "paper")
SECTIONS = {"prediction": "rmse", "reward": "mean"}
DIRECTIONS = ("lower", "higher", "within_spread")
# What the other method is to PerSim: one of the paper's baselines, one of our
# ablations (the paper has no numbers for them), or the reference.
AGAINST = ("baseline", "ablation", "bound")
# The paper's reward tables: mean ± std over this many trials (appendix E).
PAPER_TRIALS = 5
NOTE_KINDS = ("measurement", "hypothesis")
# The bootstrap's seed: the same record gives the same intervals.
SEED = 0


def mean_of(results: dict, method: str, section: str, field: str) -> float | None:
    """The mean over the test agents of `method`'s `section` / `field` list;
    None where the method or field did not run."""
    row = report.method_row(results, method, section)
    return report.mean_or_none((row or {}).get(field))


class Verdict(NamedTuple):
    """A claim checked with its noise.

    Attributes:
      outcome: "holds", "fails" or "inconclusive" (`intervals.verdict`); for
        the paper's prediction numbers, which have no spread, the comparison
        of the means ("holds" / "fails") with `means_only` set.
      interval: the difference (method − other) of the means over agents and
        its 95 % interval.
      means_only: True where no spread exists to test the difference with.
    """

    outcome: str
    interval: intervals.Interval
    means_only: bool = False


def _finite(values) -> np.ndarray | None:
    array = np.asarray([np.nan if v is None else v for v in (values or [])], np.float64)
    return array if array.size and np.all(np.isfinite(array)) else None


def _finite_episodes(values) -> np.ndarray | None:
    """(T, K, E) per-episode values as an array, or None when absent or any
    is missing (an unscored episode) or not finite."""
    if not values:
        return None
    try:
        array = np.asarray(values, np.float64)
    except (TypeError, ValueError):         # None entries, ragged lists
        return None
    return array if array.ndim == 3 and np.all(np.isfinite(array)) else None


def _prediction_interval(mine: dict, theirs: dict) -> intervals.Interval | None:
    """The difference of two methods' mean RMSE over agents with its interval:
    the bootstrap over trials and episodes of the per-episode RMSE where both
    rows hold them, every episode scored (`rmse_episodes`, (T, K, E)); else
    the normal interval from each agent's std of the per-episode RMSE over
    its scored episodes (records made before the per-episode errors were kept)."""
    episodes = [_finite_episodes(row.get("rmse_episodes")) for row in (mine, theirs)]
    if all(e is not None for e in episodes) and episodes[0].shape[1] == episodes[1].shape[1]:
        return intervals.bootstrap_difference(episodes[0], episodes[1], seed=SEED)
    means = [_finite(row.get("rmse")) for row in (mine, theirs)]
    if any(m is None for m in means) or means[0].shape != means[1].shape:
        return None
    errors = []
    for row in (mine, theirs):
        std = _finite(row.get("rmse_std"))
        scored = (row.get("episodes") or 0) * (row.get("trials") or 1)
        errors.append(std / math.sqrt(scored - 1) if std is not None and scored > 1
                      else np.full(means[0].shape, np.nan))
    sizes = sorted({(row.get("trials") or 1, row.get("episodes")) for row in (mine, theirs)})
    over = ("normal, from the mean and std of the per-episode RMSE; "
            + " vs ".join(f"{t} trial{'s' if t > 1 else ''} × {e} episodes" for t, e in sizes)
            + " per agent: episode noise only")
    return intervals.normal_difference(means[0], errors[0], means[1], errors[1], over=over)


def _reward_interval(mine: dict, theirs: dict) -> intervals.Interval | None:
    if mine.get("returns") is None or theirs.get("returns") is None:
        return None
    return intervals.bootstrap_difference(mine["returns"], theirs["returns"], seed=SEED)


@dataclasses.dataclass(frozen=True)
class Claim:
    """One of the paper's claims: `method`'s `section` mean over the test
    agents beside `other`'s. `direction` "lower" / "higher": `method`'s mean
    is below / above `other`'s; "within_spread": `method`'s mean is at least
    `other`'s minus `other`'s mean std over agents."""

    id: str
    text: str
    other: str
    section: str
    direction: str
    against: str
    method: str = "persim"

    def __post_init__(self):
        if self.section not in SECTIONS or self.direction not in DIRECTIONS:
            raise ValueError(f"claim {self.id!r}: section must be one of {sorted(SECTIONS)} and "
                             f"direction one of {DIRECTIONS}")
        if self.against not in AGAINST:
            raise ValueError(f"claim {self.id!r}: against must be one of {AGAINST}")

    @property
    def field(self) -> str:
        """The field of the section compared: "rmse" or "mean"."""
        return SECTIONS[self.section]

    def _direction_and_margin(self, results: dict) -> tuple[str, float] | None:
        if self.direction != "within_spread":
            return self.direction, 0.0
        spread = mean_of(results, self.other, self.section, "std")
        return None if spread is None else ("higher", spread)

    def verdict(self, results: dict) -> Verdict | None:
        """The claim on our numbers with its interval; None where a method
        did not run."""
        mine, theirs = (report.method_row(results, m, self.section)
                        for m in (self.method, self.other))
        direction = self._direction_and_margin(results)
        if not mine or not theirs or direction is None:
            return None
        interval = (_reward_interval if self.section == "reward" else _prediction_interval)(
            mine, theirs)
        if interval is None:
            return None
        return Verdict(intervals.verdict(interval, *direction), interval)

    def paper_verdict(self, env: str, dataset: str) -> Verdict | None:
        """The claim on the paper's own numbers: reward with the normal
        interval of its per-agent std over 5 trials (std / √5); prediction
        (no spread in its tables) on the means only."""
        rows = paper_results(env, dataset)
        mine, theirs = (report.method_row(rows, m, self.section)
                        for m in (self.method, self.other))
        direction = self._direction_and_margin(rows)
        if not mine or not theirs or direction is None:
            return None
        means = [_finite(row.get(self.field)) for row in (mine, theirs)]
        if any(m is None for m in means):
            return None
        if self.section == "prediction":
            difference = float(means[0].mean() - means[1].mean())
            interval = intervals.Interval(difference, difference, difference,
                                          "the paper's means (its prediction tables give no "
                                          "spread)")
            return Verdict(intervals.verdict(interval, *direction), interval, means_only=True)
        errors = [_finite(row.get("std")) for row in (mine, theirs)]
        errors = [np.full(means[0].shape, np.nan) if e is None else e / math.sqrt(PAPER_TRIALS)
                  for e in errors]
        interval = intervals.normal_difference(
            means[0], errors[0], means[1], errors[1],
            over=f"normal, from the paper's std over its {PAPER_TRIALS} trials")
        return Verdict(intervals.verdict(interval, *direction), interval)


CLAIMS = (
    Claim("prediction_vs_vanilla_cadm", "PerSim predicts better than Vanilla CaDM",
          "vanilla_cadm", "prediction", "lower", "baseline"),
    Claim("prediction_vs_pe_ts_cadm", "PerSim predicts better than PE-TS CaDM",
          "pe_ts_cadm", "prediction", "lower", "baseline"),
    Claim("reward_vs_vanilla_cadm", "PerSim earns more than Vanilla CaDM",
          "vanilla_cadm", "reward", "higher", "baseline"),
    Claim("reward_vs_pe_ts_cadm", "PerSim earns more than PE-TS CaDM",
          "pe_ts_cadm", "reward", "higher", "baseline"),
    Claim("reward_vs_bcq_p", "PerSim earns more than BCQ-P", "bcq_p", "reward", "higher",
          "baseline"),
    Claim("reward_vs_bcq_a", "PerSim earns more than BCQ-A", "bcq_a", "reward", "higher",
          "baseline"),
    Claim("reward_within_true_env_mpc", "PerSim is within True env + MPC's spread",
          "true_env_mpc", "reward", "within_spread", "bound"),
    Claim("prediction_vs_population", "The population model predicts worse than PerSim",
          "population", "prediction", "lower", "ablation"),
    Claim("reward_vs_population", "The population model earns less than PerSim",
          "population", "reward", "higher", "ablation"),
    Claim("prediction_vs_per_agent", "The per-agent model predicts worse than PerSim",
          "per_agent", "prediction", "lower", "ablation"),
    Claim("reward_vs_per_agent", "The per-agent model earns less than PerSim",
          "per_agent", "reward", "higher", "ablation"),
)
CLAIMS_BY_ID = {claim.id: claim for claim in CLAIMS}


# ---------------------------------------------------------------------------
# Notes


@dataclasses.dataclass(frozen=True)
class Note:
    """A note with its numbers filled in from its measurement files.

    Attributes:
      id: the note's name in notes.json.
      kind: "measurement" or "hypothesis".
      text: the text, every `{name}` replaced by the value its JSON path reads.
      file: the committed measurement file the note rests on.
      files: every file its numbers come from (`file` first).
      command: the command that reproduces `file`.
    """

    id: str
    kind: str
    text: str
    file: str
    files: tuple[str, ...]
    command: str

    def render(self) -> str:
        """The note as REPORT.md prints it: labelled, with its command and files."""
        label = "Hypothesis: " if self.kind == "hypothesis" else "Measured: "
        files = ", ".join(f"`{name}`" for name in self.files)
        return f"{label}{self.text} (`{self.command}`; {files})"


class Notes(NamedTuple):
    """The record's notes by key: `causes` (method, env, dataset[, preset])
    of departures from the paper; `claims` (claim id, env, dataset[, preset])
    of claims that do not hold."""

    causes: dict
    claims: dict


def _load_file(path: str, root: str, cache: dict):
    """A JSON file, or a JSON-lines file as the list of its rows."""
    if path not in cache:
        full = os.path.join(root, path)
        with open(full, encoding="utf-8") as handle:
            if path.endswith(".jsonl"):
                cache[path] = [json.loads(line) for line in handle if line.strip()]
            else:
                cache[path] = json.load(handle)
    return cache[path]


def _walk(node, segments: list[str]):
    """The value at `segments` of a JSON tree: dict keys, list indices, slices
    `a:b` and `*` (every element) of lists."""
    if not segments:
        return node
    head, rest = segments[0], segments[1:]
    if isinstance(node, list):
        if head == "*":
            return [_walk(item, rest) for item in node]
        if ":" in head:
            start, stop = (int(x) if x else None for x in head.split(":", 1))
            return [_walk(item, rest) for item in node[start:stop]]
        return _walk(node[int(head)], rest)
    if isinstance(node, dict):
        return _walk(node[head], rest)
    raise KeyError(head)


REDUCERS = {"min": min, "max": max, "mean": lambda xs: sum(xs) / len(xs)}


def _format(value, spec: str) -> str:
    if isinstance(value, list):
        return ", ".join(_format(item, spec) for item in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number")
    return format(value, spec)


def _resolve_value(spec, default_file: str, root: str, cache: dict) -> tuple[str, str]:
    """(formatted value, its file) of one `values` entry: a JSON path in the
    note's file, or {path, file, where, reduce, format}."""
    spec = {"path": spec} if isinstance(spec, str) else dict(spec)
    unknown = set(spec) - {"path", "file", "where", "reduce", "format"}
    if unknown or "path" not in spec:
        raise ValueError(f"needs a 'path' and at most file, where, reduce, format; "
                         f"has {sorted(spec)}")
    path = spec.get("file", default_file)
    node = _load_file(path, root, cache)
    if spec.get("where"):
        if not isinstance(node, list):
            raise ValueError(f"'where' needs a list of rows; {path} is not one")
        node = [row for row in node
                if all(row.get(key) == value for key, value in spec["where"].items())]
        if not node:
            raise ValueError(f"no row of {path} has {spec['where']}")
    value = _walk(node, [s for s in str(spec["path"]).split("/") if s])
    if spec.get("reduce"):
        if spec["reduce"] not in REDUCERS or not isinstance(value, list) or not value:
            raise ValueError(f"reduce {spec['reduce']!r} needs one of {sorted(REDUCERS)} and "
                             "a non-empty list")
        if any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in value):
            raise ValueError(f"reduce {spec['reduce']!r}: {value!r} holds a non-number")
        value = REDUCERS[spec["reduce"]](value)
    return _format(value, spec.get("format", ".3g")), path


def resolve_note(entry: dict, where: str, root: str = ROOT, cache: dict | None = None) -> Note:
    """The note of one notes.json entry with its numbers read from its files.

    Raises:
      ValueError naming the entry where its file is missing, a placeholder has
      no value, a value is unused, or a value's path does not resolve.
    """
    cache = {} if cache is None else cache
    for name in ("id", "text", "file", "command"):
        if not isinstance(entry.get(name), str) or not entry[name]:
            raise ValueError(f"{where}: {name} must be a non-empty string")
    where = f"{where} ({entry['id']})"
    if entry.get("kind") not in NOTE_KINDS:
        raise ValueError(f"{where}: kind {entry.get('kind')!r} is not one of {NOTE_KINDS}")
    values = entry.get("values") or {}
    files = [entry["file"]] + [v["file"] for v in values.values()
                               if isinstance(v, dict) and "file" in v]
    for path in dict.fromkeys(files):
        if not os.path.isfile(os.path.join(root, path)):
            raise ValueError(f"{where}: its measurement file {path} is missing; run "
                             f"`{entry['command']}` or remove the note")
    named = {field for _, field, _, _ in string.Formatter().parse(entry["text"]) if field}
    if named != set(values):
        raise ValueError(f"{where}: placeholders {sorted(named)} and values {sorted(values)} "
                         "must name the same numbers")
    filled, used = {}, [entry["file"]]
    for name, spec in values.items():
        try:
            filled[name], path = _resolve_value(spec, entry["file"], root, cache)
        except (KeyError, IndexError, TypeError, ValueError) as error:
            raise ValueError(f"{where}: value {name!r} ({spec!r}) does not resolve: "
                             f"{error!r}") from None
        used.append(path)
    return Note(entry["id"], entry["kind"], entry["text"].format(**filled), entry["file"],
                tuple(dict.fromkeys(used)), entry["command"])


def _note_key(entry: dict, subject: str, subjects, where: str) -> tuple:
    """(subject, env, dataset[, preset]) of one notes.json entry, checked."""
    for name, valid in ((subject, subjects), ("env", ALL_ENVS), ("dataset", DATASETS),
                        ("preset", (None, *PRESETS))):
        if entry.get(name) not in valid:
            raise ValueError(f"{where}: {name} {entry.get(name)!r} is not one of "
                             f"{[v for v in valid if v is not None]}; fix the entry")
    key = (entry[subject], entry["env"], entry["dataset"])
    return key if entry.get("preset") is None else (*key, entry["preset"])


def _note_table(entries: list, subject: str, subjects, where: str, root: str,
                cache: dict) -> dict:
    table = {}
    for index, entry in enumerate(entries):
        key = _note_key(entry, subject, subjects, f"{where}[{index}]")
        if key in table:
            raise ValueError(f"{where}[{index}]: a second note for {key}; merge the two")
        table[key] = resolve_note(entry, f"{where}[{index}]", root, cache)
    return table


def load_notes(path: str | os.PathLike = NOTES_PATH, root: str = ROOT) -> Notes:
    """The notes of `path` (default: the record's `notes.json`), each entry's
    key checked against the known methods, claims, envs, datasets and presets
    and its numbers read from its files (paths from `root`, the repository)."""
    with open(path, encoding="utf-8") as handle:
        raw = json.load(handle)
    cache: dict = {}
    return Notes(
        _note_table(raw.get("departure_causes", []), "method", ALL_METHODS,
                    f"{path}: departure_causes", root, cache),
        _note_table(raw.get("claim_notes", []), "claim", tuple(CLAIMS_BY_ID),
                    f"{path}: claim_notes", root, cache))


def known_cause(table: dict, results: dict, subject: str) -> Note | None:
    """`table`'s note for (subject, env, dataset) with this preset, else
    without one (a note that holds for every preset)."""
    where = (subject, results["env"], results["dataset"])
    return table.get((*where, results.get("preset"))) or table.get(where)


# ---------------------------------------------------------------------------
# What is measured about a claim or a departure


def paper_results(env: str, dataset: str) -> dict:
    """The paper's rows for a cell in our `results.json` shape (the parts
    the claims read): the claims checked on the paper's own numbers."""
    rows = paper.paper_rows(env, dataset)
    methods = {name: {"prediction": rows["prediction"].get(name),
                      "reward": rows["reward"].get(name)}
               for name in paper.METHOD_NAMES}
    methods["true_env_mpc"]["reward"] = rows["true_env_mpc"]
    return {"env": env, "dataset": dataset, "preset": "paper", "methods": methods}


def _number(x: float, section: str) -> str:
    return f"{x:.1f}" if section == "reward" else f"{x:.3g}"


def describe(verdict: Verdict | None, section: str) -> str:
    """"−12.3 [−20.1, −4.0]": a verdict's difference and interval."""
    if verdict is None:
        return report.DASH
    found = verdict.interval
    if verdict.means_only:
        return f"{_number(found.difference, section)} (means only)"
    if found.low is None:
        return f"{_number(found.difference, section)} (no interval)"
    return (f"{_number(found.difference, section)} [{_number(found.low, section)}, "
            f"{_number(found.high, section)}]")


def claim_means(results: dict, claim: Claim) -> str:
    """" (PerSim 451.7, BCQ-P 1504.9)" for a claim comparing PerSim with a
    baseline; "" for the others."""
    if claim.against != "baseline":
        return ""
    mine, theirs = (mean_of(results, m, claim.section, claim.field)
                    for m in (claim.method, claim.other))
    if None in (mine, theirs):
        return ""
    return (f" ({paper.METHOD_NAMES[claim.method]} {mine:.4g}, "
            f"{paper.METHOD_NAMES[claim.other]} {theirs:.4g})")


def claim_notes(results: dict, claim: Claim, notes: Notes) -> list[str]:
    """What is known about `claim` not holding in this cell: the same check
    on the paper's own numbers where it does not hold there either, the
    recorded note, and, for a baseline that earns more than PerSim, how both
    compare with True env + MPC in this cell."""
    found = []
    theirs = claim.paper_verdict(results["env"], results["dataset"])
    if theirs is not None and theirs.outcome != "holds":
        found.append(f"On the paper's own numbers: {theirs.outcome}"
                     + claim_means(paper_results(results["env"], results["dataset"]), claim)
                     + f", difference {describe(theirs, claim.section)}.")
    noted = known_cause(notes.claims, results, claim.id)
    if noted:
        found.append(noted.render())
    if claim.against == "baseline" and claim.section == "reward":
        other = mean_of(results, claim.other, "reward", "mean")
        true = mean_of(results, "true_env_mpc", "reward", "mean")
        persim = mean_of(results, claim.method, "reward", "mean")
        if None not in (other, true, persim) and other > true:
            line = (f"{paper.METHOD_NAMES[claim.other]} ({other:.1f}) also earns more than "
                    f"True env + MPC ({true:.1f}), the paper's planner on each agent's exact "
                    "dynamics")
            if persim > true:
                line += (f"; so does PerSim ({persim:.1f}): with this planner True env + MPC "
                         "is no upper bound")
            found.append(line + ".")
    return found


def _standard_errors(row: dict) -> tuple[np.ndarray, str] | None:
    """Per agent, the standard error of our mean reward and what it is over:
    trials' means where there are several, else one trial's episodes; None
    with a single episode of a single trial."""
    if row.get("returns") is None:
        return None
    returns = np.asarray(row["returns"], np.float64)          # (T, K, E)
    if returns.shape[0] > 1:
        means = returns.mean(axis=2)
        return means.std(axis=0, ddof=1) / math.sqrt(returns.shape[0]), "trials"
    if returns.shape[2] > 1:
        return returns[0].std(axis=1, ddof=1) / math.sqrt(returns.shape[2]), \
            "one trial's episodes"
    return None


def reward_against_paper(results: dict, method: str = "persim") -> intervals.Interval | None:
    """Our mean reward over the test agents minus the paper's, with the 95 %
    normal interval from our standard errors (`_standard_errors`: over trials,
    or one trial's episodes) and the paper's std over its 5 trials / √5; None
    where either side lacks the row, bounds None where our noise is unmeasured."""
    ours = report.method_row(results, method, "reward")
    theirs = report.method_row(paper_results(results["env"], results["dataset"]), method,
                               "reward")
    mine = _finite((ours or {}).get("mean"))
    paper_means, paper_std = (_finite((theirs or {}).get(k)) for k in ("mean", "std"))
    if mine is None or paper_means is None or paper_std is None:
        return None
    errors = _standard_errors(ours)
    se = np.full(mine.shape, np.nan) if errors is None else errors[0]
    over = (f"normal: ours over {'—' if errors is None else errors[1]}, the paper's over its "
            f"{PAPER_TRIALS} trials")
    return intervals.normal_difference(mine, se, paper_means,
                                       paper_std / math.sqrt(PAPER_TRIALS), over=over)


def _reward_departure(ours: dict, theirs: dict, labels: list[str]) -> list[str]:
    """Agents whose mean reward differs from the paper's by more than the 95 %
    normal interval of the difference (our standard error, over trials or one
    trial's episodes, and the paper's std over 5 trials / √5)."""
    errors = _standard_errors(ours)
    z = intervals.normal_quantile(0.975)
    lines = []
    for i, (m, pm, ps) in enumerate(zip(ours["mean"], theirs["mean"], theirs["std"])):
        if None in (m, pm, ps):
            continue
        se_ours = 0.0 if errors is None else float(errors[0][i])
        half = z * math.sqrt(se_ours ** 2 + (ps / math.sqrt(PAPER_TRIALS)) ** 2)
        if abs(m - pm) > half:
            lines.append(f"({labels[i]}) {m:.1f} vs {pm:g}, difference {m - pm:+.1f} ± "
                         f"{half:.1f}")
    if lines and errors is None:
        lines[-1] += (" (our noise unmeasured: one episode of one trial; the interval is the "
                      "paper's alone)")
    return lines


def _prediction_departure(ours: dict, theirs: dict, labels: list[str]) -> list[str]:
    return [f"({labels[i]}) {m:.3g} vs {pm:g}" for i, (m, pm) in
            enumerate(zip(ours["rmse"], theirs["rmse"]))
            if None not in (m, pm) and max(m, pm) > 0.001 and
            (m > 2 * max(pm, 0.001) or m < 0.5 * pm)]


def departures(results: dict, notes: Notes) -> list[str]:
    """Our rows that depart from the paper's, one line per method and section:
    reward means whose difference from the paper's lies outside its 95 %
    normal interval (`_reward_departure`); RMSE more than 2× off the paper's
    (both above its 0.001 rounding; the paper gives no spread for it). A
    method's last line ends with its recorded note, where there is one."""
    rows_paper = paper.paper_rows(results["env"], results["dataset"])
    paper_reward = {**rows_paper["reward"], "true_env_mpc": rows_paper["true_env_mpc"]}
    labels = report.agent_labels(results, report.agent_count(results))
    lines = []
    for method, name in paper.METHOD_NAMES.items():
        for section, theirs, departure, what in (
                ("reward", paper_reward.get(method), _reward_departure, "reward"),
                ("prediction", rows_paper["prediction"].get(method), _prediction_departure,
                 "prediction RMSE")):
            ours = report.method_row(results, method, section)
            off = departure(ours, theirs, labels) if ours and theirs else []
            if off:
                lines.append(f"{name}, {what} ours vs paper: {'; '.join(off)}")
        cause = known_cause(notes.causes, results, method)
        if cause and lines and lines[-1].startswith(name):
            lines[-1] += f". {cause.render()}"
    return lines


# ---------------------------------------------------------------------------
# REPORT.md's sections on claims and departures


def cell_name(results: dict) -> str:
    """"MountainCar / Pure-ε-20": a cell's env and dataset as the paper names them."""
    return f"{paper.display_name(results['env'])} / {report.dataset_label(results['dataset'])}"


MARKS = {"holds": "holds", "fails": "**fails**", "inconclusive": "*inconclusive*"}


def _mark(verdict: Verdict | None) -> str:
    if verdict is None:
        return report.DASH
    return MARKS[verdict.outcome] + ("†" if verdict.means_only else "")


def _boundary(claim: Claim, results: dict) -> str:
    """" (boundary −12.9)" for a within-spread claim: the difference it needs."""
    if claim.direction != "within_spread":
        return ""
    spread = mean_of(results, claim.other, claim.section, "std")
    return "" if spread is None else f" (boundary {-spread:.1f})"


def _counts(verdicts: list[Verdict | None]) -> dict:
    known = [v for v in verdicts if v is not None]
    return {outcome: sum(v.outcome == outcome for v in known) for outcome in intervals.OUTCOMES}


def _checks(count: int) -> str:
    return f"{count} check" + ("" if count == 1 else "s")


def _tally(counts: dict) -> str:
    """"3 hold, 1 fails, 0 are inconclusive"."""
    verbs = {"holds": ("holds", "hold"), "fails": ("fails", "fail"),
             "inconclusive": ("is inconclusive", "are inconclusive")}
    return ", ".join(f"{counts[o]} {verbs[o][counts[o] != 1]}" for o in intervals.OUTCOMES)


def _count_text(counts: dict) -> str:
    return " / ".join(str(counts[outcome]) for outcome in intervals.OUTCOMES)


def _claims_table(cells: list[dict]) -> tuple[list[str], dict, dict]:
    header = ["claim", *[cell_name(r) for r in cells], "holds / fails / inconclusive (paper)"]
    rows, ours_all, paper_all = [], [], []
    for claim in CLAIMS:
        ours = [claim.verdict(r) for r in cells]
        theirs = [claim.paper_verdict(r["env"], r["dataset"]) for r in cells]
        # The paper's checks are counted where ours ran, so the two counts compare.
        theirs_checked = [t for o, t in zip(ours, theirs) if o is not None]
        ours_all += ours
        paper_all += theirs_checked
        paper_count = (f" ({_count_text(_counts(theirs_checked))})"
                       if any(t is not None for t in theirs_checked) else "")
        count = (_count_text(_counts(ours)) + paper_count if any(o is not None for o in ours)
                 else "not run")
        rows.append([claim.text, *[_mark(o) + (f" ({_mark(t)})" if t is not None else "")
                                   for o, t in zip(ours, theirs)], count])
    return [report.markdown_table(header, rows), ""], _counts(ours_all), _counts(paper_all)


def claims_section(cells: list[dict], notes: Notes) -> list[str]:
    """REPORT.md's lines on the paper's claims: the verdicts by cell, the
    counts, and what is known about each claim that does not hold."""
    lines = ["## The paper's claims on our numbers", "",
             "Each check compares two methods' means over the 5 test agents (RMSE lower is "
             "better, reward higher) with the 95 % interval of their difference: it **holds** "
             "when the whole interval lies on the claimed side, **fails** when all of it lies "
             "on the other side, and is *inconclusive* when the interval covers the boundary or "
             "nothing measured the noise (one episode of one trial). Rewards: a bootstrap of "
             "the recorded episode returns (trials drawn with replacement, then each drawn "
             "trial's episodes, per agent; 2000 resamples; with one trial, episode noise only, "
             "not the noise of training another model). Prediction: a normal interval from each "
             "agent's mean and std of the per-episode RMSE (the record keeps no per-episode "
             "errors). \"Within True env + MPC's spread\": PerSim's mean is above True env + "
             "MPC's minus its mean std over agents. Each cell's differences and intervals are in "
             "its section below.", "",
             "In brackets the same check on the paper's own numbers: rewards with the normal "
             "interval of the paper's std over its 5 trials (std / √5 per agent), counted only "
             "where ours ran; † marks its prediction checks, on the means alone (its prediction "
             "tables give no spread). – where a method did not run (the paper has no population "
             "or per-agent model); the paper's verdict beside a – is shown, not counted.", ""]
    table, ours, theirs = _claims_table(cells)
    lines += table
    checked = sum(ours.values())
    lines += [f"In all, of {checked} checks on our numbers: {_tally(ours)}. The same claims "
              f"in the same cells on the paper's own numbers ({_checks(sum(theirs.values()))}, "
              f"where ours ran and the paper has both methods): {_tally(theirs)}.", ""]
    failing = [(claim, results, verdict.outcome, found) for claim in CLAIMS for results in cells
               if (verdict := claim.verdict(results)) is not None and verdict.outcome != "holds"
               and (found := claim_notes(results, claim, notes))]
    if failing:
        lines += ["Where a claim does not hold (fails or inconclusive), what is known about it:",
                  ""]
        lines += [f"- {claim.text}, **{cell_name(results)}** ({outcome}): {' '.join(found)}"
                  for claim, results, outcome, found in failing]
        lines.append("")
    return lines


def cell_claims_table(results: dict) -> list[str]:
    """A cell's claims with the two means, the difference, its interval and
    what the interval is over."""
    rows = []
    for claim in CLAIMS:
        verdict = claim.verdict(results)
        if verdict is None:
            continue
        theirs = claim.paper_verdict(results["env"], results["dataset"])
        means = [mean_of(results, m, claim.section, claim.field) for m in (claim.method,
                                                                            claim.other)]
        rows.append([claim.text, *[report.DASH if m is None else _number(m, claim.section)
                                   for m in means],
                     describe(verdict, claim.section), _mark(verdict) + _boundary(claim, results),
                     verdict.interval.over,
                     f"{_mark(theirs)} {describe(theirs, claim.section)}"
                     + _boundary(claim, paper_results(results["env"], results["dataset"]))
                     if theirs else report.DASH])
    if not rows:
        return []
    return ["### The paper's claims here: difference (PerSim − other) and its 95 % interval",
            "",
            report.markdown_table(["claim", "PerSim", "other", "difference [95 % interval]",
                                   "verdict", "interval over", "paper's"], rows), ""]


def departures_section(cells: list[dict], notes: Notes) -> list[str]:
    """REPORT.md's lines on where each cell departs from the paper."""
    lines = ["## Where we depart from the paper", "",
             "Test agents whose mean reward differs from the paper's by more than the 95 % "
             "normal interval of the difference (printed ± half its width: our standard error, "
             "over trials where there are several, else over one trial's episodes, with the "
             "paper's std over its 5 trials / √5), or whose RMSE is more than 2× off (the paper "
             "gives no spread for prediction); with the note recorded about it, where there is "
             "one.", ""]
    for results in cells:
        found = departures(results, notes)
        lines.append(f"- **{cell_name(results)}**: " + ("none." if not found else ""))
        lines += [f"  - {line}" for line in found]
    lines.append("")
    return lines
