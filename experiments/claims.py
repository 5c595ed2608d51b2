"""The paper's comparative claims, checked on a cell's numbers, and what is
measured about the cells that depart from the paper.

    from experiments import claims
    notes = claims.load_notes()                    # experiments/results/notes.json
    for claim in claims.CLAIMS:
        claim.check(results)                       # True, False or None (not run)
    claims.claim_notes(results, claims.CLAIMS[4], notes)
    claims.departures(results, notes)

`results` is a cell's `results.json` dict (`experiments.run`); each claim
names the methods it compares, the section and field it reads and the
direction that makes it hold. The notes are data beside the record
(`experiments/results/notes.json`), keyed by (method or claim id, env,
dataset[, preset]); each holds its text and the committed files that measured
it. `experiments.reproduce` renders both into each preset's REPORT.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import NamedTuple

from experiments import paper, report
from experiments.datagen.datasets import DATASETS

NOTES_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "notes.json")
ALL_ENVS = ("mountaincar", "cartpole", "halfcheetah")
ALL_METHODS = tuple(paper.METHOD_NAMES)
PRESETS = ("quick", "paper")
SECTIONS = {"prediction": "rmse", "reward": "mean"}
DIRECTIONS = ("lower", "higher", "within_spread")
# What the other method is to PerSim: one of the paper's baselines, one of our
# ablations (the paper has no numbers for them), or the upper bound.
AGAINST = ("baseline", "ablation", "bound")


def mean_of(results: dict, method: str, section: str, field: str) -> float | None:
    """The mean over the test agents of `method`'s `section` / `field` list;
    None where the method or field did not run."""
    row = report.method_row(results, method, section)
    return report.mean_or_none((row or {}).get(field))


@dataclasses.dataclass(frozen=True)
class Claim:
    """One of the paper's claims: `method`'s `section` / `field` mean beside
    `other`'s. `direction` "lower" / "higher": `method`'s mean is below /
    above `other`'s; "within_spread": `method`'s mean is at least `other`'s
    minus `other`'s mean std."""

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

    def check(self, results: dict) -> bool | None:
        """Whether the claim holds on `results`; None where a method did not run."""
        mine = mean_of(results, self.method, self.section, self.field)
        theirs = mean_of(results, self.other, self.section, self.field)
        if self.direction == "within_spread":
            spread = mean_of(results, self.other, self.section, "std")
            if None in (mine, theirs, spread):
                return None
            return mine >= theirs - spread
        if mine is None or theirs is None:
            return None
        return mine < theirs if self.direction == "lower" else mine > theirs


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
    """What is measured: `text`, and `sources`, the committed files (paths
    from the repository root) that measured it."""

    text: str
    sources: tuple[str, ...] = ()


class Notes(NamedTuple):
    """The record's notes by key: `causes` (method, env, dataset[, preset])
    of departures from the paper; `claims` (claim id, env, dataset[, preset])
    of claims that do not hold."""

    causes: dict
    claims: dict


def _note_key(entry: dict, subject: str, subjects, where: str) -> tuple:
    """(subject, env, dataset[, preset]) of one notes.json entry, checked."""
    for name, valid in ((subject, subjects), ("env", ALL_ENVS), ("dataset", DATASETS),
                        ("preset", (None, *PRESETS))):
        if entry.get(name) not in valid:
            raise ValueError(f"{where}: {name} {entry.get(name)!r} is not one of "
                             f"{[v for v in valid if v is not None]}; fix the entry")
    if not isinstance(entry.get("text"), str) or not entry["text"]:
        raise ValueError(f"{where}: text must be a non-empty string")
    key = (entry[subject], entry["env"], entry["dataset"])
    return key if entry.get("preset") is None else (*key, entry["preset"])


def _note_table(entries: list, subject: str, subjects, where: str) -> dict:
    table = {}
    for index, entry in enumerate(entries):
        key = _note_key(entry, subject, subjects, f"{where}[{index}]")
        if key in table:
            raise ValueError(f"{where}[{index}]: a second note for {key}; merge the two")
        table[key] = Note(entry["text"], tuple(entry.get("sources") or ()))
    return table


def load_notes(path: str | os.PathLike = NOTES_PATH) -> Notes:
    """The notes of `path` (default: the record's `notes.json`), each entry's
    key checked against the known methods, claims, envs, datasets and presets."""
    with open(path, encoding="utf-8") as handle:
        raw = json.load(handle)
    return Notes(
        _note_table(raw.get("departure_causes", []), "method", ALL_METHODS,
                    f"{path}: departure_causes"),
        _note_table(raw.get("claim_notes", []), "claim", tuple(CLAIMS_BY_ID),
                    f"{path}: claim_notes"))


def known_cause(table: dict, results: dict, subject: str) -> str | None:
    """The text of `table`'s note for (subject, env, dataset) with this
    preset, else without one (a note that holds for every preset)."""
    where = (subject, results["env"], results["dataset"])
    note = table.get((*where, results.get("preset"))) or table.get(where)
    return note.text if note else None


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
    """What is measured about `claim` failing in this cell: whether the
    paper's own numbers hold it, the recorded note and, for a baseline that
    earns more than PerSim, whether it also earns more than True env + MPC
    (then no simulator, however exact, planned as the paper plans, would have
    won)."""
    found = []
    theirs = paper_results(results["env"], results["dataset"])
    if claim.check(theirs) is False:
        found.append("The paper's own numbers do not hold it either"
                     + claim_means(theirs, claim) + ".")
    noted = known_cause(notes.claims, results, claim.id)
    if noted:
        found.append(noted)
    if claim.against == "baseline" and claim.section == "reward":
        other = mean_of(results, claim.other, "reward", "mean")
        true = mean_of(results, "true_env_mpc", "reward", "mean")
        if None not in (other, true) and other > true:
            found.append(f"{paper.METHOD_NAMES[claim.other]} ({other:.1f}) also earns more than "
                         f"True env + MPC ({true:.1f}), the paper's planner on each agent's exact "
                         "dynamics: with this planner no simulator could have won.")
    return found


def _reward_departure(ours: dict, theirs: dict, labels: list[str]) -> list[str]:
    return [f"({labels[i]}) {m:.1f} vs {pm:g} ± {ps:g}" for i, (m, s, pm, ps) in
            enumerate(zip(ours["mean"], ours["std"], theirs["mean"], theirs["std"]))
            if None not in (m, s, pm, ps) and abs(m - pm) > s + ps]


def _prediction_departure(ours: dict, theirs: dict, labels: list[str]) -> list[str]:
    return [f"({labels[i]}) {m:.3g} vs {pm:g}" for i, (m, pm) in
            enumerate(zip(ours["rmse"], theirs["rmse"]))
            if None not in (m, pm) and max(m, pm) > 0.001 and
            (m > 2 * max(pm, 0.001) or m < 0.5 * pm)]


def departures(results: dict, notes: Notes) -> list[str]:
    """Our rows outside the paper's spread, one line per method and section:
    reward means further from the paper's than the sum of both stds; RMSE
    more than 2× off the paper's (both above its 0.001 rounding). A method's
    last line ends with its measured cause, where there is one."""
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
            lines[-1] += f". Cause: {cause}"
    return lines


# ---------------------------------------------------------------------------
# REPORT.md's sections on claims and departures


def cell_name(results: dict) -> str:
    """"MountainCar / Pure-ε-20": a cell's env and dataset as the paper names them."""
    return f"{paper.display_name(results['env'])} / {report.dataset_label(results['dataset'])}"


def _mark(value: bool | None) -> str:
    return {True: "yes", False: "**no**", None: report.DASH}[value]


def _claims_table(cells: list[dict]) -> list[str]:
    header = ["claim", *[cell_name(r) for r in cells], "holds (paper)"]
    papers = [paper_results(r["env"], r["dataset"]) for r in cells]
    rows, held, checked, held_paper, checked_paper = [], 0, 0, 0, 0
    for claim in CLAIMS:
        values = [claim.check(r) for r in cells]
        theirs = [claim.check(r) for r in papers]
        known = [v for v in values if v is not None]
        known_paper = [v for v in theirs if v is not None]
        held, checked = held + sum(known), checked + len(known)
        held_paper, checked_paper = held_paper + sum(known_paper), checked_paper + len(known_paper)
        paper_count = f" ({sum(known_paper)} / {len(known_paper)})" if known_paper else ""
        rows.append([claim.text, *[_mark(v) + (f" ({_mark(t)})" if t is not None else "")
                                   for v, t in zip(values, theirs)],
                     f"{sum(known)} / {len(known)}{paper_count}"])
    return [report.markdown_table(header, rows), "",
            f"In all: {held} of {checked} checks hold on our numbers, {held_paper} of "
            f"{checked_paper} on the paper's.", ""]


def claims_section(cells: list[dict], notes: Notes) -> list[str]:
    """REPORT.md's lines on the paper's claims: the table of claims by cell,
    the count that hold, and what is measured about each failing one."""
    lines = ["## The paper's claims on our numbers", "",
             "Means over the test agents (RMSE lower is better, reward higher); in brackets the "
             "same check on the paper's own numbers; – where a method did not run (the paper "
             "has no population or per-agent model).", ""]
    lines += _claims_table(cells)
    failing = [(claim, results, found) for claim in CLAIMS for results in cells
               if claim.check(results) is False
               and (found := claim_notes(results, claim, notes))]
    if failing:
        lines += ["Where a claim does not hold, what is measured about it:", ""]
        lines += [f"- {claim.text}, **{cell_name(results)}**: {' '.join(found)}"
                  for claim, results, found in failing]
        lines.append("")
    return lines


def departures_section(cells: list[dict], notes: Notes) -> list[str]:
    """REPORT.md's lines on where each cell departs from the paper."""
    lines = ["## Where we depart from the paper", "",
             "Test agents whose reward is further from the paper's than both spreads together, "
             "or whose RMSE is more than 2× off; with the cause where one has been measured.", ""]
    for results in cells:
        found = departures(results, notes)
        lines.append(f"- **{cell_name(results)}**: " + ("none." if not found else ""))
        lines += [f"  - {line}" for line in found]
    lines.append("")
    return lines
