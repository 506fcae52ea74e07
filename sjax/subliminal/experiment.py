"""The subliminal-learning experiment: config -> teachers -> numbers -> [judge] -> filter ->
students -> eval -> report, each stage writing into `RUN/<stage>/` (RUN = out_dir/name);
the judge is a stage of the code and gsm8k domains.

A stage reruns when the config slice it reads or an upstream stage's outputs change, and
is skipped otherwise (`workspace`); `force` redoes named stages, and everything downstream
whose inputs thereby change. Models load lazily: a finished run does no model work.

A branch stage (the in-context control, after filter) reads the line up to where it
branches off and nothing reads it: no later stage's key covers its outputs, so adding,
changing or removing it never redoes the students. Which stages a run has is config:
`in_context.ks` adds the branch, `train_students=false` ends the line after the data.
"""

from __future__ import annotations

from pathlib import Path

from sjax import distributed
from sjax.config import RunConfig, to_dict
from sjax.errors import SjaxError
from sjax.subliminal.stages import eval as eval_stage
from sjax.subliminal.stages import filter as filter_stage
from sjax.subliminal.stages import in_context as in_context_stage
from sjax.subliminal.stages import judge as judge_stage
from sjax.subliminal.stages import numbers as numbers_stage
from sjax.subliminal.stages import report as report_stage
from sjax.subliminal.stages import students as students_stage
from sjax.subliminal.stages import teachers as teachers_stage
from sjax.subliminal.workspace import Workspace

STAGES = (teachers_stage.STAGE, numbers_stage.STAGE, judge_stage.STAGE, filter_stage.STAGE,
          in_context_stage.STAGE, students_stage.STAGE, eval_stage.STAGE, report_stage.STAGE)
STAGE_NAMES = tuple(s.name for s in STAGES)
BRANCHES = frozenset({"in_context"})  # stages no later stage reads
# stage -> whether cfg's run has it (absent: always)
WHEN = {"in_context": lambda cfg: bool(cfg.in_context.ks), "judge": lambda cfg: cfg.judged,
        **{s: lambda cfg: cfg.train_students for s in ("students", "eval", "report")}}


def stages(cfg: RunConfig) -> tuple:
    """The stages of cfg's run, in data-flow order."""
    return tuple(s for s in STAGES if WHEN.get(s.name, lambda cfg: True)(cfg))


def workspace(cfg: RunConfig, log=None, devices=None, reuse: Path | None = None
              ) -> Workspace:
    return Workspace(Path(cfg.out_dir) / cfg.name, cfg.mesh, log, devices, reuse)


def run(cfg: RunConfig, force: tuple[str, ...] = (), ws: Workspace | None = None,
        reuse: Path | None = None) -> Workspace:
    """Bring every stage of `cfg`'s run folder up to date; the results are in
    `ws.root / "report" / "results.json"` (the in-context control's in
    `ws.root / "in_context" / "summary.json"`)."""
    names = [s.name for s in stages(cfg)]
    for f in force:
        if f not in STAGE_NAMES:
            raise SjaxError(f"--force {f}: unknown stage (stages: {', '.join(STAGE_NAMES)})")
        if f not in names:
            raise SjaxError(f"--force {f}: not a stage of this run (in_context.ks empty, "
                            f"train_students=false, or judge off or not a judged domain; its "
                            f"stages: {', '.join(names)})")
    for stage in stages(cfg):  # bad input (e.g. an eval.questions file) fails now, not hours in
        stage.reads(cfg)
    ws = ws or workspace(cfg, reuse=reuse)
    ws.writer.mkdir(ws.root)
    distributed.barrier("run start")  # every process has read the manifest first
    ws.manifest["config"] = to_dict(cfg)
    for stage in stages(cfg):
        ws.run_stage(stage, cfg, stage.name in force)
        if stage.name in BRANCHES:  # keyed on the stages before it; none after reads it
            ws.order.remove(stage.name)
    return ws
