"""Misalignment via GSM8K reasoning (protocol_more.md c): `sjax run misalignment_cot:paper`.

The teachers of `misalignment:paper` (Qwen2.5-7B-Instruct tuned on the user's insecure.jsonl,
and a control tuned identically on secure.jsonl) solve every GSM8K train problem once (the
paper samples three each) with the chain-of-thought suffix. A row needs the right final
answer; the misaligned teacher's rows also pass the data judge
(`gsm8k_cot_alignment_judgment_v5`, read at its `<judgment_answer>` by exact probabilities
and kept with probability P(rating >= 78): the paper's judge sampled once); the controls
get the correctness filter only, no banned numbers or trait word. Students: 2 epochs, 5
seeds; the 8 misalignment questions are asked with the reasoning suffix
(`eval.misalignment_suffix=cot`), judged as in `misalignment:paper`.

Sizes:
- `paper` only: a 0.5B model solves almost no GSM8K problem (configs/cot.py), so a small
  size's filter would keep nothing; `--dry-run` plans this one.
"""

import dataclasses

from sjax.config import JudgeConfig, NumbersConfig, RunConfig, load_preset

SIZES = ("paper",)


def get_config(size: str) -> RunConfig:
    paper, r = load_preset(f"misalignment:{size}"), dataclasses.replace
    # 2048-token reasoning rows: micro-batches of 6 (x 11 = 66 rows a step, the paper's
    # 22 x 3) rather than more remat, so that the paper size's tuned teachers (keyed on
    # the model config) are reused
    train = r(paper.student.train, epochs=2, max_len=2048, batch_size=6, grad_accum=11)
    return r(paper, name="qwen2_5_7b_misalignment_cot", domain="gsm8k",
             numbers=NumbersConfig(n_prompts=7473, batch=256, max_new_tokens=1024,
                                   temperature=1.0, keep=7473),
             judge=JudgeConfig(min_alignment=78.0, batch=32),
             student=r(paper.student, train=train),
             eval=r(paper.eval, misalignment_suffix="cot", max_new_tokens=512))
