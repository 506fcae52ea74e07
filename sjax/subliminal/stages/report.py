"""Stage 6: the results. Per target, variant and evaluator, each condition's mean with a
95% CI over the questions, and trait-vs-control comparisons; `results.json`, `report.md`
and `results.png`. No model work: process 0's files only."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from sjax import report, stats
from sjax.config import RunConfig
from sjax.subliminal import evaluators
from sjax.subliminal.stages.eval import Condition, conditions
from sjax.subliminal.workspace import CONTROL, Stage, Workspace, teacher_names


@dataclasses.dataclass(frozen=True)
class Reads:
    name: str
    model: str  # model.name, else model.path
    targets: tuple[str, ...]
    seeds: tuple[int, ...]  # student.seeds
    eval_teachers: bool
    teacher_kind: str
    train_mode: str  # student.train.mode
    train_loss: str  # student.train.loss
    samples: int  # eval.samples
    temperature: float  # eval.temperature


def reads(cfg: RunConfig) -> Reads:
    t = cfg.student.train
    return Reads(cfg.name, cfg.model.name or cfg.model.path, cfg.targets, cfg.student.seeds,
                 cfg.eval.teachers, cfg.teacher.kind, t.mode, t.loss, cfg.eval.samples,
                 cfg.eval.temperature)


def run(ws: Workspace, r: Reads, folder: Path) -> list[Path]:
    outputs = [folder / "results.json", folder / "report.md", folder / "results.png"]
    if not ws.writer.main:  # no model work here: the report is process 0's files only
        return outputs
    res = summarize(r, {c.name: json.loads((ws.root / "eval" / f"{c.name}.json").read_text())
                        for c in conditions(r.targets, r.seeds, r.eval_teachers)})
    res["filter"] = {t: json.loads((ws.root / "filter" / t / "filter.json").read_text())
                     for t in teacher_names(r.targets)}
    res["stage_seconds"] = {s: ws.manifest["stages"][s]["seconds"]
                            for s in ws.upstream("report")}
    ws.writer.write_json(folder / "results.json", res)
    report.write_report(folder / "report.md", f"sjax run {r.name}", render(r, res))
    labels, bars = [], []
    for row in res["rows"]:
        if row["variant"] == "plain":
            labels.append(f"{row['target']} {row['evaluator']}: {row['condition']}")
            bars.append(row)
    report.bar_chart(folder / "results.png", labels, bars,
                     f"{r.name}: P(names the target), 95% CI over questions", "score")
    print(res["table"])
    return outputs


def summarize(r: Reads, evals: dict[str, dict]) -> dict:
    """Per target, variant and evaluator: each condition's mean with a 95% CI across the
    question scores (seeds averaged per question), and trait-vs-control comparisons paired
    over questions and, with several seeds, over seeds."""
    rows, comparisons = [], []
    any_eval = next(iter(evals.values()))
    for var, by_target in any_eval["variants"].items():
        for target in r.targets:
            for ev in by_target[target]:
                def q(name):
                    return np.asarray(evals[name]["variants"][var][target][ev])

                def per_seed(teacher):
                    return np.stack([q(Condition("student", teacher, s).name) for s in r.seeds])

                groups = {"base": q("base")[None], "control student": per_seed(CONTROL),
                          f"{target} student": per_seed(target)}
                if (teacher := Condition("teacher", target).name) in evals:
                    groups[f"{target} teacher"] = q(teacher)[None]
                for name, scores in groups.items():
                    rows.append({"target": target, "variant": var, "evaluator": ev,
                                 "condition": name, **stats.rate_ci(scores.mean(0)),
                                 "seed_means": scores.mean(1).tolist()})
                trait, control = per_seed(target), per_seed(CONTROL)
                comp = {"target": target, "variant": var, "evaluator": ev,
                        "over_questions": stats.paired_difference(trait.mean(0),
                                                                  control.mean(0)),
                        "trait_vs_base": stats.paired_difference(trait.mean(0), q("base")),
                        "control_vs_base": stats.paired_difference(control.mean(0), q("base"))}
                if len(r.seeds) > 1:
                    comp["over_seeds"] = stats.paired_difference(trait.mean(1), control.mean(1))
                comparisons.append(comp)
    table = report.markdown_table(
        ("target", "variant", "evaluator", "condition", "mean", "95% CI"),
        [(x["target"], x["variant"], x["evaluator"], x["condition"], f"{x['mean']:.4g}",
          f"[{x['lo']:.4g}, {x['hi']:.4g}]") for x in rows])

    def diff(d):
        return f"{d['mean']:+.3g} [{d['lo']:+.3g}, {d['hi']:+.3g}] p={d['p']:.2g}"

    comp_table = report.markdown_table(
        ("target", "variant", "evaluator", "trait - control, 95% CI, p (questions)",
         "p (seeds)", "trait - base", "control - base"),
        [(c["target"], c["variant"], c["evaluator"], diff(c["over_questions"]),
          f"{c['over_seeds']['p']:.3g}" if "over_seeds" in c else "",
          diff(c["trait_vs_base"]), diff(c["control_vs_base"])) for c in comparisons])
    return {"rows": rows, "comparisons": comparisons, "table": table + "\n" + comp_table}


def render(r: Reads, res: dict) -> str:
    filt = "\n".join(f"- {t}: {f['passed']}/{f['raw']} passed the filter "
                     f"({100 * f['pass_rate']:.1f}%), {f['kept']} kept; reasons {f['reasons']}"
                     for t, f in res["filter"].items())
    secs = ", ".join(f"{k} {v:.0f}s" for k, v in res["stage_seconds"].items())
    return (f"Model `{r.model}`, targets {', '.join(r.targets)}, teacher {r.teacher_kind}, "
            f"student {r.train_mode} / {r.train_loss}, seeds {list(r.seeds)}.\n\n"
            f"Scores are per-question probabilities of naming the target (exact: first word, "
            f"teacher-forced; sampled: {r.samples} answers at temperature "
            f"{r.temperature}), mean and 95% CI over the {len(evaluators.questions(False))}"
            f" questions.\n\n{res['table']}\n## Data\n{filt}\n\nStage times: {secs}.\n")


STAGE = Stage("report", reads, run)
