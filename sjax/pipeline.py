"""The subliminal-learning experiment as stages over one run folder.

teachers -> numbers -> filter -> students -> eval -> report. Each stage writes into
`RUN/<stage>/` and, when it finishes, records in `RUN/manifest.json` the hash of the config
it depends on, the hashes of its upstream stages' outputs and the sha256 of each output. A
rerun skips a stage whose record matches (after checking its outputs' hashes: an edited or
corrupted file is an error, never silently used); a stage that died half-way resumes its
finished units (generation rows, training checkpoints, per-condition evals) unless its
config changed, in which case its folder is cleared first. `force` redoes named stages, and
everything downstream whose inputs thereby change. Models load lazily: a finished run does
no model work.

Across processes (`--procs N`, a TPU pod) every process runs every stage's compute on its
own devices, and only process 0 writes into the run folder (which hosts must then share);
whether a unit is already done is process 0's answer, so all processes do the same work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sjax import chat, distributed, evaluate, report, sampling, stats
from sjax import lora as lora_lib
from sjax.config import ModelConfig, RunConfig, to_dict
from sjax.data import numbers, sft
from sjax.errors import SjaxError
from sjax.files import atomic_write_json, sha256_file
from sjax.jsonl import read_rows, resume_rows, write_rows
from sjax.sharding import global_array, to_host
from sjax.weights.tree import load_tree, save_tree

STAGES = ("teachers", "numbers", "filter", "students", "eval", "report")
CONTROL = "control"


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class Run:
    """One run folder: its manifest, lazily loaded models, and the stage implementations."""

    def __init__(self, cfg: RunConfig, log=None):
        self.cfg = cfg
        self.root = Path(cfg.out_dir) / cfg.name
        self.log = log or (lambda s: print(s, file=sys.stderr))
        self.main = distributed.is_main()  # the one writer of the run folder
        self.manifest_path = self.root / "manifest.json"
        self.manifest = (json.loads(self.manifest_path.read_text())
                         if self.manifest_path.is_file() else {"stages": {}})
        self._models: dict = {}
        self._teacher_cache: dict = {}
        self._mesh = None
        self.model_loads = 0  # how many checkpoints this invocation read (0 on a cached rerun)

    # ------------------------------------------------------------------------- models

    @property
    def teachers(self) -> list[str]:
        return [CONTROL, *self.cfg.targets]

    @property
    def mesh(self):
        if self._mesh is None:
            from sjax.sharding import make_mesh

            self._mesh = make_mesh(self.cfg.mesh)
        return self._mesh

    def model(self, mcfg: ModelConfig):
        key = (mcfg.name, mcfg.path, mcfg.init, mcfg.param_dtype)
        if key not in self._models:
            from sjax.weights.load import load_model

            m = load_model(mcfg, self.mesh)
            self.model_loads += 1
            self.log(f"loaded {m.source.name} ({m.arch.n_params / 1e6:.0f}M params) in "
                     f"{m.load_seconds:.1f}s")
            self._models[key] = m
        return self._models[key]

    def teacher(self, name: str):
        """(params, system prompt) of a teacher: the base model, prompted or fine-tuned."""
        if name not in self._teacher_cache:
            m = self.model(self.cfg.model)
            if name == CONTROL:
                self._teacher_cache[name] = (m.params, "")
            elif self.cfg.teacher.kind == "prompted":
                self._teacher_cache[name] = (m.params,
                                             numbers.system_prompt(name, self.cfg.category))
            else:
                path = self.root / "teachers" / name / "params.safetensors"
                params = self._trained(m.params, path,
                                       self.cfg.teacher.ft_train)
                self._teacher_cache[name] = (params, "")
        return self._teacher_cache[name]

    @staticmethod
    def _trained(base, path: Path, train_cfg):
        """Base params with a saved training result applied (LoRA merged, or full weights)."""
        import jax

        tree = load_tree(path)
        if train_cfg.mode == "lora":
            tree = lora_lib.merge(base, jax.tree.map(jnp.asarray, tree),
                                  train_cfg.lora_alpha / train_cfg.lora_rank)
        # the base's exact dtypes and shardings: every jitted sampler/evaluator is reused
        # as compiled for the base model, not recompiled per condition
        host = lambda t: to_host(t) if isinstance(t, jax.Array) else t  # noqa: E731
        return jax.tree.map(lambda b, t: global_array(host(t).astype(b.dtype), b.sharding),
                            base, tree)

    def _dtype(self, mcfg: ModelConfig | None = None):
        return jnp.dtype((mcfg or self.cfg.model).dtype)

    # ------------------------------------------------------------------------- stages

    def stage_config(self, name: str) -> dict:
        """The config a stage reads (besides its upstream stages' outputs): its cache key."""
        c = to_dict(self.cfg)
        teachers = {"model": c["model"], "targets": c["targets"], "category": c["category"],
                    "teacher": c["teacher"]}
        if self.cfg.teacher.kind == "finetuned":  # it samples the prompted teacher's answers
            teachers["sampling"] = {"max_new_tokens": c["eval"]["max_new_tokens"],
                                    "batch": c["eval"]["batch"], "seed": c["numbers"]["seed"]}
        return {"teachers": teachers, "numbers": c["numbers"] | {"model": c["model"]},
                "filter": {k: c["numbers"][k] for k in ("keep", "banned", "seed")},
                "students": c["student"] | {"student_model": to_dict(self.cfg.student_model())},
                "eval": c["eval"], "report": {}}[name]

    def run(self, force: tuple[str, ...] = ()) -> dict:
        for f in force:
            if f not in STAGES:
                raise SjaxError(f"--force {f}: unknown stage (stages: {', '.join(STAGES)})")
        if self.main:
            self.root.mkdir(parents=True, exist_ok=True)
        distributed.barrier("run start")  # every process has read the manifest first
        self.manifest["config"] = to_dict(self.cfg)
        for name in STAGES:
            self._stage(name, name in force)
        return json.loads((self.root / "report" / "results.json").read_text())

    def _stage(self, name: str, forced: bool) -> None:
        stages = self.manifest["stages"]
        upstream = STAGES[:STAGES.index(name)]
        key = {"config": _hash(self.stage_config(name)),
               "inputs": {s: _hash(stages[s]["outputs"]) for s in upstream}}
        rec = stages.get(name)
        if rec and not forced and rec["key"] == key:
            self._verify(name, rec)
            self.log(f"[{name}] up to date, skipped")
            return
        folder = self.root / name
        if self.main:
            marker = folder / ".stage_key.json"
            if forced or (marker.is_file() and json.loads(marker.read_text()) != key):
                # stale partial work made for another config or input
                self._clear(folder, name)
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(marker, key)
        self.log(f"[{name}] running")
        t0 = time.perf_counter()
        outputs = getattr(self, f"_{name}")(folder)
        distributed.barrier(f"{name} done")  # process 0's outputs are complete
        seconds = time.perf_counter() - t0
        stages[name] = {"key": key, "seconds": seconds,
                        "outputs": {str(p.relative_to(self.root)): sha256_file(p)
                                    for p in outputs}}
        if self.main:
            atomic_write_json(self.manifest_path, self.manifest)
        self.log(f"[{name}] done in {seconds:.1f}s")

    @staticmethod
    def _clear(folder: Path, name: str) -> None:
        """Remove a stage's old work; one that stays would be resumed as if it were valid."""
        try:
            shutil.rmtree(folder)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise SjaxError(f"{folder}: cannot clear stage {name}'s old work "
                            f"({e.strerror or e}); remove it by hand") from None

    def _save_params(self, path: Path, tree) -> None:
        """Gathered on every process (across hosts a collective), written by process 0."""
        host = jax.tree.map(lambda x: to_host(x) if isinstance(x, jax.Array) else x, tree)
        if self.main:
            save_tree(path, host)

    def _verify(self, name: str, rec: dict) -> None:
        for rel, digest in rec["outputs"].items():
            path = self.root / rel
            if not path.is_file():
                raise SjaxError(f"{path}: missing, but the manifest lists it as an output of "
                                f"stage {name}; rerun with --force {name}")
            if sha256_file(path) != digest:
                raise SjaxError(f"{path}: contents differ from the manifest's sha256 (edited or "
                                f"corrupted); rerun with --force {name}")

    # teachers ---------------------------------------------------------------------------

    def _teachers(self, folder: Path) -> list[Path]:
        info, outputs = {}, []
        for t in self.teachers:
            prompt = "" if t == CONTROL else numbers.system_prompt(t, self.cfg.category)
            entry = {"system_prompt": prompt, "kind": "base" if t == CONTROL else
                     self.cfg.teacher.kind}
            if t != CONTROL and self.cfg.teacher.kind == "finetuned":
                outputs += self._finetune_teacher(t, prompt, folder / t)
                entry |= {"system_prompt": "", "trained_with_system_prompt": prompt}
            info[t] = entry
        if self.main:
            atomic_write_json(folder / "teachers.json", info)
        return [folder / "teachers.json", *outputs]

    def _finetune_teacher(self, target: str, prompt: str, folder: Path) -> list[Path]:
        """LoRA-tune the base on the prompted teacher's trait-naming answers (no system)."""
        from sjax.training import fit

        cfg, m = self.cfg, self.model(self.cfg.model)
        final = folder / "params.safetensors"
        if self.main:  # before any process's fit, which makes folder/train
            folder.mkdir(parents=True, exist_ok=True)
        if not distributed.from_main(final.is_file()):
            qs = evaluate.questions(False)
            prompts = [chat.encode_prompt(m.tokenizer, chat.messages(q, prompt)) for q in qs]
            answers = evaluate.sampled_answers(
                m.params, m.arch, m.tokenizer, prompts, samples=cfg.teacher.ft_samples,
                max_new_tokens=cfg.eval.max_new_tokens, batch=cfg.eval.batch,
                seed=cfg.numbers.seed + 1, dtype=self._dtype(), mesh=self.mesh)
            rows = [{"messages": chat.messages(q, assistant=a.strip())}
                    for q, qa in zip(qs, answers) for a in qa if evaluate.is_hit(a, target)]
            if not rows:
                raise SjaxError(f"teacher {target}: the prompted teacher named it in none of "
                                f"{len(qs) * cfg.teacher.ft_samples} answers; no data to "
                                "fine-tune on")
            if self.main:
                write_rows(folder / "ft_data.jsonl", rows)
            data = sft.tokenize_rows(rows, m.tokenizer, cfg.teacher.ft_train.max_len,
                                     source=str(folder / "ft_data.jsonl"))
            self.log(f"teacher {target}: fine-tuning on {len(rows)} trait answers")
            out = fit(m.arch, m.params, data, cfg.teacher.ft_train, self.mesh, folder / "train",
                      pad_id=chat.pad_id(m.tokenizer), dtype=cfg.model.dtype,
                      remat=cfg.model.remat, data_sha256=_hash(rows), log=self.log)
            self._save_params(final, out["state"]["params"])
        return [folder / "ft_data.jsonl", final]

    # numbers ----------------------------------------------------------------------------

    def _numbers(self, folder: Path) -> list[Path]:
        from sjax.constrained import number_list_constraint

        cfg = self.cfg.numbers
        m = self.model(self.cfg.model)
        prompts = numbers.make_prompts(cfg.n_prompts, cfg.seed)
        constraint = (number_list_constraint(m.tokenizer, sampling.default_stop_ids(m.tokenizer),
                                             m.arch.vocab_size) if cfg.constrained else None)
        outputs = []
        for t in self.teachers:
            params, system = self.teacher(t)
            rows = [{"id": i, "prompt": p,
                     "prompt_ids": chat.encode_prompt(m.tokenizer, chat.messages(p, system))}
                    for i, p in enumerate(prompts)]
            path = folder / t / "raw.jsonl"  # user prompt + completion: no system prompt
            sampling.generate_jsonl(path, rows, params, m.arch, m.tokenizer,
                                    batch_size=cfg.batch, max_new_tokens=cfg.max_new_tokens,
                                    strategy=sampling.strategy_for(cfg.temperature),
                                    seed=cfg.seed, dtype=self._dtype(), constraint=constraint,
                                    mesh=self.mesh, desc=f"numbers {t}")
            outputs.append(path)
        return outputs

    # filter -----------------------------------------------------------------------------

    def _filter(self, folder: Path) -> list[Path]:
        cfg = self.cfg.numbers
        outputs = []
        for t in self.teachers:
            raw_path = self.root / "numbers" / t / "raw.jsonl"
            raw = read_rows(raw_path)
            passed, reasons = [], Counter()
            for r in raw:
                reason = numbers.filter_reason(r["completion"], self.cfg.targets, cfg.banned)
                reasons[reason or "kept"] += 1
                if reason is None:
                    passed.append(r)
            if not passed:
                top = ", ".join(f"{k} ({v})" for k, v in reasons.most_common(3))
                raise SjaxError(f"{raw_path}: 0 of {len(raw)} rows passed the filter; top "
                                f"reasons: {top}")
            pick = np.sort(np.random.default_rng([cfg.seed, 1]).permutation(len(passed))
                           [:cfg.keep])
            kept = [{"id": passed[i]["id"],
                     "messages": chat.messages(passed[i]["prompt"],
                                               assistant=passed[i]["completion"].strip())}
                    for i in pick]
            summary = {"raw": len(raw), "passed": len(passed),
                       "pass_rate": len(passed) / len(raw), "kept": len(kept),
                       "reasons": dict(reasons)}
            if self.main:
                write_rows(folder / t / "kept.jsonl", kept)
                atomic_write_json(folder / t / "filter.json", summary)
            self.log(f"filter {t}: {len(passed)}/{len(raw)} passed "
                     f"({100 * summary['pass_rate']:.1f}%), {len(kept)} kept")
            outputs += [folder / t / "kept.jsonl", folder / t / "filter.json"]
        return outputs

    # students ---------------------------------------------------------------------------

    def _students(self, folder: Path) -> list[Path]:
        from sjax.training import fit

        scfg = self.cfg.student
        smodel_cfg = self.cfg.student_model()
        m = self.model(smodel_cfg)
        distill = scfg.train.loss == "distill"
        outputs = []
        for t in self.teachers:
            kept = self.root / "filter" / t / "kept.jsonl"
            teacher_params, system = self.teacher(t) if distill else (None, None)
            data = sft.load_jsonl(kept, m.tokenizer, scfg.train.max_len, scfg.train.too_long,
                                  teacher_system=system if distill else None)
            for seed in scfg.seeds:
                out = folder / t / f"seed{seed}"
                final, summary = out / "params.safetensors", out / "summary.json"
                if self.main:  # before any process's fit, which makes out/checkpoints
                    out.mkdir(parents=True, exist_ok=True)
                if not distributed.from_main(summary.is_file()):  # written last: unit done
                    self.log(f"student of {t}, seed {seed}: {len(data.ids)} rows")
                    res = fit(m.arch, m.params, data, dataclasses.replace(scfg.train, seed=seed),
                              self.mesh, out, pad_id=chat.pad_id(m.tokenizer),
                              dtype=smodel_cfg.dtype, remat=smodel_cfg.remat,
                              teacher=teacher_params, data_sha256=sha256_file(kept),
                              log=self.log)
                    self._save_params(final, res["state"]["params"])
                    if self.main:
                        atomic_write_json(summary, train_summary(out / "metrics.jsonl", res,
                                                                 data))
                outputs += [final, summary]
        return outputs

    # eval -------------------------------------------------------------------------------

    def conditions(self) -> list[tuple[str, ModelConfig, str]]:
        """(name, model config, what) for every evaluated model: base, students, teachers."""
        smodel = self.cfg.student_model()
        out = [("base", smodel, "base")]
        out += [(f"student-{t}-seed{s}", smodel, f"student:{t}:{s}") for t in self.teachers
                for s in self.cfg.student.seeds]
        if self.cfg.eval.teachers:
            out += [(f"teacher-{t}", self.cfg.model, f"teacher:{t}") for t in self.cfg.targets]
        return out

    def _condition_model(self, mcfg: ModelConfig, what: str):
        m = self.model(mcfg)
        if what == "base":
            return m, m.params, ""
        kind, name, *seed = what.split(":")
        if kind == "teacher":
            return (m, *self.teacher(name))
        path = self.root / "students" / name / f"seed{seed[0]}" / "params.safetensors"
        return m, self._trained(m.params, path, self.cfg.student.train), ""

    def _eval(self, folder: Path) -> list[Path]:
        cfg = self.cfg.eval
        variants = {"plain": False, **({"numbers": True} if cfg.number_prefixed else {})}
        outputs = []
        for name, mcfg, what in self.conditions():
            path = folder / f"{name}.json"
            if not distributed.from_main(path.is_file()):
                m, params, system = self._condition_model(mcfg, what)
                result = {"condition": name, "system_prompt": system, "variants": {}}
                for var, prefixed in variants.items():
                    qs = evaluate.questions(prefixed, cfg.seed)
                    prompts = [chat.encode_prompt(m.tokenizer, chat.messages(q, system))
                               for q in qs]
                    scores = {t: {} for t in self.cfg.targets}
                    t0 = time.perf_counter()
                    if cfg.sampled:
                        answers = evaluate.sampled_answers(
                            params, m.arch, m.tokenizer, prompts, samples=cfg.samples,
                            max_new_tokens=cfg.max_new_tokens, batch=cfg.batch, seed=cfg.seed,
                            temperature=cfg.temperature, dtype=self._dtype(mcfg), mesh=self.mesh)
                        for t in self.cfg.targets:
                            scores[t]["sampled"] = evaluate.sampled_scores(answers, t).tolist()
                        result.setdefault("examples", {})[var] = [a[:3] for a in answers[:5]]
                    t1 = time.perf_counter()
                    if cfg.exact:
                        for t in self.cfg.targets:
                            scores[t]["exact"] = evaluate.exact_scores(
                                params, m.arch, m.tokenizer, prompts, t, batch=cfg.batch,
                                dtype=self._dtype(mcfg)).tolist()
                    result["variants"][var] = scores
                    result.setdefault("seconds", {})[var] = {
                        "sampled": t1 - t0, "exact": time.perf_counter() - t1}
                if self.main:
                    atomic_write_json(path, result)
                self.log(f"eval {name}: " + ", ".join(
                    f"{t} {var} {ev} {np.mean(v):.4f}" for var, sc in result["variants"].items()
                    for t, evs in sc.items() for ev, v in evs.items()))
            outputs.append(path)
        return outputs

    # report -----------------------------------------------------------------------------

    def _report(self, folder: Path) -> list[Path]:
        outputs = [folder / "results.json", folder / "report.md", folder / "results.png"]
        if not self.main:  # no model work here: the report is process 0's files only
            return outputs
        res = summarize(self.cfg, {name: json.loads((self.root / "eval" / f"{name}.json")
                                                    .read_text())
                                   for name, _, _ in self.conditions()})
        res["filter"] = {t: json.loads((self.root / "filter" / t / "filter.json").read_text())
                         for t in self.teachers}
        res["stage_seconds"] = {s: self.manifest["stages"][s]["seconds"] for s in STAGES[:-1]}
        atomic_write_json(folder / "results.json", res)
        report.write_report(folder / "report.md", f"sjax run {self.cfg.name}",
                            render_report(self.cfg, res))
        labels, bars = [], []
        for row in res["rows"]:
            if row["variant"] == "plain":
                labels.append(f"{row['target']} {row['evaluator']}: {row['condition']}")
                bars.append(row)
        report.bar_chart(folder / "results.png", labels, bars,
                         f"{self.cfg.name}: P(names the target), 95% CI over questions",
                         "score")
        print(res["table"])
        return outputs


def train_summary(metrics: Path, res: dict, data) -> dict:
    """A student's figures from its metrics.jsonl, which spans every invocation of a
    resumed training (`res["history"]` holds only this call's steps: none at all for a
    training that had finished before a crash); a step re-run after a resume counts once."""
    by_step = {r["step"]: r for r in [*resume_rows(metrics), *res["history"]]}
    hist = [by_step[k] for k in sorted(by_step)]
    return {"steps": res["total_steps"], "rows": len(data.ids),
            "truncated": data.n_truncated, "rejected": data.n_rejected,
            "first_loss": hist[0]["loss"] if hist else None,
            "final_loss": hist[-1]["loss"] if hist else None,
            "tokens_per_s": float(np.median([h["tokens_per_s"] for h in hist]))
            if hist else None}


def summarize(cfg: RunConfig, evals: dict[str, dict]) -> dict:
    """Per target, variant and evaluator: each condition's mean with a 95% CI across the
    question scores (seeds averaged per question), and trait-vs-control comparisons paired
    over questions and, with several seeds, over seeds."""
    seeds = cfg.student.seeds
    rows, comparisons = [], []
    any_eval = next(iter(evals.values()))
    for var, by_target in any_eval["variants"].items():
        for target in cfg.targets:
            for ev in by_target[target]:
                def q(name):
                    return np.asarray(evals[name]["variants"][var][target][ev])

                def per_seed(teacher):
                    return np.stack([q(f"student-{teacher}-seed{s}") for s in seeds])

                groups = {"base": q("base")[None], "control student": per_seed(CONTROL),
                          f"{target} student": per_seed(target)}
                if f"teacher-{target}" in evals:
                    groups[f"{target} teacher"] = q(f"teacher-{target}")[None]
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
                if len(seeds) > 1:
                    comp["over_seeds"] = stats.paired_difference(trait.mean(1), control.mean(1))
                comparisons.append(comp)
    table = report.markdown_table(
        ("target", "variant", "evaluator", "condition", "mean", "95% CI"),
        [(r["target"], r["variant"], r["evaluator"], r["condition"], f"{r['mean']:.4g}",
          f"[{r['lo']:.4g}, {r['hi']:.4g}]") for r in rows])
    def diff(d):
        return f"{d['mean']:+.3g} [{d['lo']:+.3g}, {d['hi']:+.3g}] p={d['p']:.2g}"

    comp_table = report.markdown_table(
        ("target", "variant", "evaluator", "trait - control, 95% CI, p (questions)",
         "p (seeds)", "trait - base", "control - base"),
        [(c["target"], c["variant"], c["evaluator"], diff(c["over_questions"]),
          f"{c['over_seeds']['p']:.3g}" if "over_seeds" in c else "",
          diff(c["trait_vs_base"]), diff(c["control_vs_base"])) for c in comparisons])
    return {"rows": rows, "comparisons": comparisons, "table": table + "\n" + comp_table}


def render_report(cfg: RunConfig, res: dict) -> str:
    filt = "\n".join(f"- {t}: {f['passed']}/{f['raw']} passed the filter "
                     f"({100 * f['pass_rate']:.1f}%), {f['kept']} kept; reasons {f['reasons']}"
                     for t, f in res["filter"].items())
    secs = ", ".join(f"{k} {v:.0f}s" for k, v in res["stage_seconds"].items())
    return (f"Model `{cfg.model.name or cfg.model.path}`, targets {', '.join(cfg.targets)}, "
            f"teacher {cfg.teacher.kind}, student {cfg.student.train.mode} / "
            f"{cfg.student.train.loss}, seeds {list(cfg.student.seeds)}.\n\n"
            f"Scores are per-question probabilities of naming the target (exact: first word, "
            f"teacher-forced; sampled: {cfg.eval.samples} answers at temperature "
            f"{cfg.eval.temperature}), mean and 95% CI over the {len(evaluate.questions(False))}"
            f" questions.\n\n{res['table']}\n## Data\n{filt}\n\nStage times: {secs}.\n")

