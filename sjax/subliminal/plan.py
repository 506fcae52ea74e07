"""`sjax run --dry-run`: what a run will do, how much compute and memory it needs, before it
touches a weight. Reads only the model's architecture (config.json or the GGUF header).

Token counts are estimated from the prompt text (~3.5 characters per token plus the chat
template), so FLOPs are estimates; memory is an upper-bound style estimate of the largest
stage (training) per device: parameters and optimizer state over the fsdp x tensor shards,
activations over the data x fsdp shards.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from sjax import report
from sjax.config import RunConfig
from sjax.errors import SjaxError
from sjax.models.transformer import ArchConfig, matmul_params
from sjax.subliminal import domains, evaluators, prompts
from sjax.training import train_flops_per_token

TEMPLATE_TOKENS = 30  # chat template around one user turn (role tags, default system line)
CHARS_PER_TOKEN = 3.5


def _tokens(text: str) -> int:
    return int(len(text) / CHARS_PER_TOKEN) + TEMPLATE_TOKENS


def _lora_params(arch: ArchConfig, rank: int) -> int:
    q, kv = arch.n_heads * arch.head_dim, arch.n_kv_heads * arch.head_dim
    d, f = arch.d_model, arch.d_ff
    per_layer = (d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d)
    return arch.n_layers * rank * per_layer


def train_memory(arch: ArchConfig, cfg: RunConfig, mesh_shape: dict, seq: int) -> dict:
    """Estimated bytes per device of one student training step (the run's peak stage)."""
    t, m = cfg.student.train, cfg.student_model()
    model_shards = mesh_shape.get("fsdp", 1) * mesh_shape.get("tensor", 1)
    batch_shards = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
    p_bytes = np.dtype(m.param_dtype).itemsize if m.param_dtype != "bfloat16" else 2
    a_bytes = 2 if m.dtype == "bfloat16" else 4
    n = arch.n_params
    out = {"params": n * p_bytes / model_shards}
    trained = n if t.mode == "full" else _lora_params(arch, t.lora_rank)
    # fp32 trainable weights (master copy or adapters), their gradient and two Adam moments
    out["grads_and_adam"] = trained * (4 + 4 + 8) / (model_shards if t.mode == "full" else 1)
    if t.mode == "full" and t.loss == "distill":
        out["teacher"] = out["params"]  # the state trains a copy; the teacher keeps the base
    if cfg.teacher.kind == "finetuned" and t.loss == "distill":
        out["teacher"] = out["params"]
    rows = -(-t.batch_size // batch_shards)  # padded to a multiple of the shards
    tokens = rows * seq
    per_layer = tokens * (10 * arch.d_model + 4 * arch.d_ff) * a_bytes
    per_layer += rows * arch.n_heads * seq * seq * 4 * 2
    saved = {"none": arch.n_layers, "dots": arch.n_layers * 0.6, "full": 1}[m.remat]
    out["activations"] = per_layer * saved + arch.n_layers * tokens * arch.d_model * a_bytes
    out["loss_chunks"] = 3 * tokens * t.vocab_chunk * 4
    out["total"] = sum(out.values())
    return out


def device_memory() -> tuple[float, str]:
    """(bytes, description) of one device's memory: HBM limit, or host RAM on CPU."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        limit = (dev.memory_stats() or {}).get("bytes_limit")
        if limit:
            return float(limit), dev.device_kind
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    n = jax.local_device_count()  # CPU "devices" share the host's RAM
    return float(ram) / n, f"host RAM / {n} CPU device(s)"


def eval_work(cfg: RunConfig, evaluator: str) -> float:
    """Tokens one evaluator processes for one model and variant: exact a prefill per
    question plus a few per target spelling; sampled and story `samples` continuations per
    prompt; mcq one prefill per (prompt, order) for each distinct choice set; misalignment
    `samples` answers per question (its judge's work is `judge_work`)."""
    ev = cfg.eval
    if evaluator == "misalignment":
        n, q = _misalignment_questions(cfg)
        return n * ev.samples * (q + ev.max_new_tokens)
    if evaluator == "exact":
        return _exact_work(cfg, _eval_questions(cfg))
    if evaluator == "sampled":
        qs = _eval_questions(cfg)
        return len(qs) * ev.samples * (float(np.mean([_tokens(x) for x in qs]))
                                       + ev.max_new_tokens)
    if evaluator == "story":
        qs = prompts.story_prompts()
        q = float(np.mean([_tokens(x) for x in qs]))
        return len(qs) * ev.samples * (q + ev.story_max_new_tokens)
    choice_sets = {evaluators.mcq_choices(cfg.category, t) for t in cfg.targets}
    qs = prompts.mcq_prompts()
    q = float(np.mean([_tokens(x) for x in qs])) + len(prompts.mcq_format()) / CHARS_PER_TOKEN
    return len(choice_sets) * len(qs) * ev.mcq_samples * (q + 10)  # + the 5 choice words


def judge_work(cfg: RunConfig) -> float:
    """Tokens the misalignment judge reads for one model: two prompts per answer (the
    template around the question and answer) and the ~200-node verdict trie after each."""
    ev = cfg.eval
    if "misalignment" not in ev.evaluators:
        return 0.0
    n_q, q = _misalignment_questions(cfg)
    template = np.mean([_tokens(prompts.judge_template(k)) for k in ("alignment", "coherence")])
    return n_q * ev.samples * 2 * (template + q + ev.max_new_tokens + 200)


def judge_row_tokens(cfg: RunConfig) -> float:
    """Tokens the data judge reads around each row: the reference judge's ~80-token
    template; protocol c's alignment judge's long template, the GSM8K prompt (~100 tokens)
    and the 0-100 verdict trie (~200 nodes)."""
    if cfg.judge_kind == "alignment":
        return _tokens(prompts.judge_template("cot_alignment")) + 100 + 200
    return 80


def _eval_questions(cfg: RunConfig) -> list[str]:
    """The evaluation questions: eval.questions' file, else the category's."""
    return (prompts.questions_file(cfg.eval.questions) if cfg.eval.questions
            else list(prompts.category_questions(cfg.category)))


def _exact_work(cfg: RunConfig, qs: list[str]) -> float:
    """The exact evaluator's tokens on `qs`: each question plus a few per target spelling."""
    return len(qs) * (float(np.mean([_tokens(x) for x in qs])) + 4 * len(cfg.targets))


def _misalignment_questions(cfg: RunConfig) -> tuple[int, float]:
    """The misalignment questions as asked (with the suffix): how many, mean tokens."""
    qs = list(prompts.misalignment_prompts(cfg.eval.misalignment_suffix).values())
    return len(qs), float(np.mean([_tokens(x) for x in qs]))


def in_context_row(cfg: RunConfig, p2: float, row_tokens: float) -> tuple:
    """The in-context control: per teacher, k and seed, every question with k kept rows (~a
    numbers row's tokens each) as its system prompt. The context is the prompts' shared
    prefix, prefilled once per unit (`evaluators.batched_node_logprobs`); each question then
    reads it from the cache, its own tokens and the target spellings' few."""
    ic = cfg.in_context
    qs = _eval_questions(cfg)[:ic.n_questions or None]
    units = (len(cfg.targets) + 1) * len(ic.seeds)
    tokens = units * sum(k * row_tokens + _exact_work(cfg, qs) for k in ic.ks)
    k = max(ic.ks)
    return ("in_context", f"{units * len(ic.ks)} ({len(cfg.targets) + 1} teachers x "
            f"{len(ic.ks)} k x {len(ic.seeds)} seeds)",
            f"{len(qs)} questions each; k={k}: ~{k * row_tokens:.0f} of {ic.max_tokens} tokens",
            p2 * tokens)


def make_plan(cfg: RunConfig, arch: ArchConfig, student_arch: ArchConfig, mesh_shape: dict,
              device_bytes: float | None = None, judge_arch: ArchConfig | None = None) -> dict:
    """The stages' work and FLOPs; `judge_arch`: the misalignment judge's (default `arch`)."""
    nc, ns = cfg.numbers, cfg.student
    teachers = len(cfg.targets) + cfg.student.control  # the control's data and students
    sample = [it.prompt for it in domains.items(cfg.domain, min(nc.n_prompts, 200), nc.seed)]
    prompt_tokens = float(np.mean([_tokens(p) for p in sample]))
    # a ten-number list is ~30-40 tokens; code and reasoning: up to the limit
    completion = min(nc.max_new_tokens, 40) if cfg.domain == "numbers" else nc.max_new_tokens
    p2, s2 = 2 * matmul_params(arch), 2 * matmul_params(student_arch)
    row_tokens = prompt_tokens + completion
    kept = min(nc.keep, nc.n_prompts)
    steps = kept // (ns.train.batch_size * ns.train.grad_accum) * ns.train.epochs
    train_tokens = steps * ns.train.batch_size * ns.train.grad_accum * row_tokens
    seq = int(min(ns.train.max_len, 2 ** np.ceil(np.log2(row_tokens))))
    train_flops = train_flops_per_token(student_arch, seq, ns.train.mode) * train_tokens
    if ns.train.loss == "distill":
        train_flops += p2 * train_tokens
    ev = cfg.eval
    n_cond = 1 + teachers * len(ns.seeds) + (len(cfg.targets) if ev.teachers else 0)
    if ns.train.loss == "distill" and ns.train.distill_on == "all":  # KL at every row token
        train_flops += 2 * train_tokens * arch.d_model * arch.vocab_size * 2
    variants = 2 if ev.number_prefixed else 1
    eval_tokens = variants * n_cond * sum(eval_work(cfg, e) for e in ev.evaluators)
    judge_flops = 2 * matmul_params(judge_arch or arch) * variants * n_cond * judge_work(cfg)
    stages = [
        ("teachers", f"{len(cfg.targets)} ({cfg.teacher.kind})",
         f"tuned on {cfg.teacher.ft_data}" if cfg.teacher.ft_data else
         f"{len(prompts.teacher_questions()) * cfg.teacher.ft_samples} answers each"
         if cfg.teacher.kind == "finetuned" else "-", 0.0),
        ("numbers", f"{teachers} teachers", f"{nc.n_prompts * teachers} completions",
         p2 * nc.n_prompts * teachers * row_tokens),
        ("filter", f"{teachers} datasets", f"<= {kept} kept each", 0.0),
        ("students", f"{teachers * len(ns.seeds)} ({ns.train.mode}, {ns.train.loss})",
         f"{steps} steps each", train_flops * teachers * len(ns.seeds)),
        ("eval", f"{n_cond} models x {variants} variants", f"~{eval_tokens / n_cond:.0f} tokens "
         "each" + (f" + ~{judge_work(cfg):.0f} judge tokens" if judge_flops else ""),
         s2 * eval_tokens + judge_flops),
        ("report", "1", "results.json, report.md, results.png", 0.0),
    ]
    if not cfg.train_students:  # the run ends after the data (and the in-context branch)
        stages = stages[:3]
    if cfg.judged:  # FLOPs at the teachers' model size
        rows = nc.n_prompts * len(cfg.targets)
        stages.insert(2, ("judge", f"{len(cfg.targets)} trait teacher(s)", f"<= {rows} verdicts",
                          p2 * rows * (judge_row_tokens(cfg) + completion)))
    if cfg.in_context.ks:
        stages.insert(3, in_context_row(cfg, p2, row_tokens))
    mem = train_memory(student_arch, cfg, mesh_shape, seq)
    plan = {"stages": [{"stage": s, "units": u, "work": w, "flops": f} for s, u, w, f in stages],
            "total_flops": sum(f for *_, f in stages), "memory_per_device": mem,
            "mesh": mesh_shape, "train_seq": seq, "prompt_tokens": prompt_tokens}
    if device_bytes is not None:
        plan["device_bytes"] = device_bytes
    return plan


def check_fits(plan: dict, model_name: str, where: str) -> None:
    mem, have = plan["memory_per_device"], plan.get("device_bytes")
    if have and mem["total"] > 0.9 * have:
        parts = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in mem.items() if k != "total")
        raise SjaxError(f"model {model_name}: needs ~{mem['total'] / 2**30:.1f} GB per device "
                        f"({parts} GB) but {where} has {have / 2**30:.1f} GB; shard it "
                        "(mesh.fsdp=N), use LoRA, bf16 params or model.remat=full")


def render_plan(plan: dict) -> str:
    rows = [(s["stage"], s["units"], s["work"], f"{s['flops'] / 1e12:.1f}")
            for s in plan["stages"]]
    table = report.markdown_table(("stage", "units", "work", "TFLOPs (est.)"), rows)
    mem = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in plan["memory_per_device"].items())
    dev = (f" of {plan['device_bytes'] / 2**30:.1f} GB available"
           if "device_bytes" in plan else "")
    return (f"{table}\ntotal ~{plan['total_flops'] / 1e12:.1f} TFLOPs; mesh {plan['mesh']}; "
            f"training memory per device (GB): {mem}{dev}\n")
