"""The subliminal-learning experiment: config -> teachers -> numbers -> filter -> students
-> eval -> report, each stage writing into `RUN/<stage>/` (RUN = out_dir/name).

A stage reruns when the config slice it reads or an upstream stage's outputs change, and
is skipped otherwise (`workspace`); `force` redoes named stages, and everything downstream
whose inputs thereby change. Models load lazily: a finished run does no model work.
"""

from __future__ import annotations

from pathlib import Path

from sjax import distributed
from sjax.config import RunConfig, to_dict
from sjax.errors import SjaxError
from sjax.subliminal.stages import eval as eval_stage
from sjax.subliminal.stages import filter as filter_stage
from sjax.subliminal.stages import numbers as numbers_stage
from sjax.subliminal.stages import report as report_stage
from sjax.subliminal.stages import students as students_stage
from sjax.subliminal.stages import teachers as teachers_stage
from sjax.subliminal.workspace import Workspace

STAGES = (teachers_stage.STAGE, numbers_stage.STAGE, filter_stage.STAGE, students_stage.STAGE,
          eval_stage.STAGE, report_stage.STAGE)
STAGE_NAMES = tuple(s.name for s in STAGES)


def workspace(cfg: RunConfig, log=None, devices=None) -> Workspace:
    return Workspace(Path(cfg.out_dir) / cfg.name, cfg.mesh, log, devices)


def run(cfg: RunConfig, force: tuple[str, ...] = (), ws: Workspace | None = None
        ) -> Workspace:
    """Bring every stage of `cfg`'s run folder up to date; the results are in
    `ws.root / "report" / "results.json"`."""
    for f in force:
        if f not in STAGE_NAMES:
            raise SjaxError(f"--force {f}: unknown stage (stages: {', '.join(STAGE_NAMES)})")
    for stage in STAGES:  # bad input (e.g. an eval.questions file) fails now, not hours in
        stage.reads(cfg)
    ws = ws or workspace(cfg)
    ws.writer.mkdir(ws.root)
    distributed.barrier("run start")  # every process has read the manifest first
    ws.manifest["config"] = to_dict(cfg)
    for stage in STAGES:
        ws.run_stage(stage, cfg, stage.name in force)
    return ws
