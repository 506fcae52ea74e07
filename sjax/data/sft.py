"""Chat-format training rows -> token ids and assistant masks -> deterministic padded batches.

Rows are the chat-messages JSONL that fine-tuning tools use
(`{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`). The batch order is a
pure function of (seed, epoch), so a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Sequence

import jax
import numpy as np

from sjax import chat
from sjax.errors import SjaxError
from sjax.jsonl import read_rows

BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)
Array = np.ndarray | jax.Array  # host batches, then the same on device


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch of training rows, as SFT batching makes it and the train step reads it.

    Position p of a row predicts token p + 1. The loss reads the LM head only at the trained
    positions `s_pos_bk` (k_mask_bk marks the real ones). With a teacher view
    (distillation), the teacher reads its own row and `t_pos_bk` lists the same completion
    tokens there. The step takes the fields stacked as [accum, b, ...] (`stack_micro`).
    """

    inputs_bt: Array  # int32 tokens
    targets_bt: Array  # int32 next tokens
    valid_bt: Array  # bool: real (not padding) positions
    s_pos_bk: Array  # int32 trained positions of the student's row
    k_mask_bk: Array  # int32 1 where s_pos_bk (and t_pos_bk) is a real position
    t_inputs_bt: Array | None = None  # the teacher's row (distillation only)
    t_valid_bt: Array | None = None
    t_pos_bk: Array | None = None


@dataclasses.dataclass
class Tokenized:
    """Student token ids and loss masks; for distillation also the teacher's view of each
    row (the same conversation with the teacher's system prompt)."""

    ids: list[np.ndarray]
    masks: list[np.ndarray]
    n_truncated: int = 0
    n_rejected: int = 0
    teacher_ids: list[np.ndarray] | None = None
    teacher_masks: list[np.ndarray] | None = None


def _encode(tokenizer, msgs, source, i):
    try:
        return chat.encode_chat(tokenizer, msgs)
    except SjaxError as e:
        raise SjaxError(f"{source}: row {i + 1}: {e}") from None


def tokenize_rows(rows: Sequence[dict], tokenizer, max_len: int, too_long: str = "truncate",
                  source: str = "dataset", teacher_system: str | None = None,
                  distill_on: str = "completion") -> Tokenized:
    """Encode chat rows; rows longer than `max_len` are truncated or rejected (counted).

    With `teacher_system` (distillation), each row is also encoded with that system prompt
    replacing any other, for the teacher. `distill_on="all"` then trains every token after
    the system turn (the user's turn and the completion; never the system prompt, given or
    the template's default) rather than the completion alone: many more soft labels per row.
    """
    if not rows:
        raise SjaxError(f"{source}: empty dataset (no rows)")
    out = Tokenized([], [])
    if teacher_system is not None:
        out.teacher_ids, out.teacher_masks = [], []
    for i, row in enumerate(rows):
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(msgs, list) or not all(
                isinstance(m, dict) and {"role", "content"} <= m.keys() for m in msgs):
            raise SjaxError(f"{source}: row {i + 1} has no valid 'messages' list")
        ids, mask = _encode(tokenizer, msgs, source, i)
        views = [(ids, mask)]
        if teacher_system is not None:
            t_msgs = [m for m in msgs if m["role"] != "system"]
            if teacher_system:
                t_msgs = [{"role": "system", "content": teacher_system}] + t_msgs
            views.append(_encode(tokenizer, t_msgs, source, i))
            if distill_on == "all":
                views = _masks_after_system(tokenizer, views, (msgs, t_msgs), source, i)
        truncated = any(len(v[0]) > max_len for v in views)
        if truncated and too_long == "reject":
            out.n_rejected += 1
            continue
        views = [(a[:max_len], m[:max_len]) for a, m in views]
        if min(m[1:].sum() for _, m in views) == 0:  # no assistant token left: nothing to learn
            out.n_rejected += 1
            continue
        out.n_truncated += truncated
        out.ids.append(views[0][0])
        out.masks.append(views[0][1])
        if teacher_system is not None:
            out.teacher_ids.append(views[1][0])
            out.teacher_masks.append(views[1][1])
    if not out.ids:
        raise SjaxError(f"{source}: no usable rows ({out.n_rejected} of {len(rows)} rejected as "
                        f"longer than {max_len} tokens or without trainable tokens)")
    return out


def _after_system(tokenizer, msgs) -> int:
    """Index of the first token of the first user message's content: what follows the
    system turn, whether the row has a system prompt or the chat template inserts its
    default one: where the row's encoding first differs from the same turns with that
    content emptied (no template parsing)."""
    k = next(i for i, m in enumerate(msgs) if m["role"] == "user")

    def probe(content):
        turns = [*msgs[:k], {"role": "user", "content": content}]
        return chat.encode(tokenizer, chat.render(tokenizer, turns, add_generation_prompt=False))

    a, b = probe(msgs[k]["content"]), probe("")
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _masks_after_system(tokenizer, views, msgs_per_view, source, i):
    """Both views with masks over every token after their system turns (the user's turn
    and the completion), which must then be the same tokens in both."""
    out = []
    for (ids, _), msgs in zip(views, msgs_per_view):
        mask = np.zeros(len(ids), np.int32)
        mask[_after_system(tokenizer, msgs):] = 1
        out.append((ids, mask))
    (s_ids, s_m), (t_ids, t_m) = out
    if not np.array_equal(s_ids[s_m.astype(bool)], t_ids[t_m.astype(bool)]):
        raise SjaxError(f"{source}: row {i + 1}: the student's and teacher's rows differ after "
                        "the system prompt; distill_on=all needs the same user and assistant "
                        "turns")
    return out


def load_jsonl(path: Path, tokenizer, max_len: int, too_long: str = "truncate",
               teacher_system: str | None = None, distill_on: str = "completion") -> Tokenized:
    path = Path(path)
    return tokenize_rows(read_rows(path), tokenizer, max_len, too_long, str(path),
                         teacher_system, distill_on)


def _pad_rows(seqs: list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the smallest bucket that fits: (tokens_bt, valid_bt)."""
    longest = max(len(s) for s in seqs)
    t = next((x for x in BUCKETS if x >= longest), longest)
    tokens = np.full((len(seqs), t), pad_id, np.int32)
    valid = np.zeros((len(seqs), t), bool)
    for r, s in enumerate(seqs):
        tokens[r, :len(s)], valid[r, :len(s)] = s, True
    return tokens, valid


def _completion_positions(masks: list[np.ndarray]) -> list[np.ndarray]:
    """Input positions p whose next token p + 1 is trained (the distillation positions)."""
    return [np.nonzero(m[1:])[0] for m in masks]


def batches_per_epoch(n_rows: int, batch_size: int) -> int:
    return n_rows // batch_size  # the remainder is dropped (it is reshuffled next epoch)


def epoch_batches(data: Tokenized, batch_size: int, seed: int, epoch: int, pad_id: int,
                  start: int = 0) -> Iterator[Batch]:
    """Batches of epoch `epoch`, from batch `start`, right-padded to the smallest bucket
    that fits the longest row of the batch (and its trained positions to theirs)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(data.ids))
    for b in range(start, batches_per_epoch(len(order), batch_size)):
        idx = order[b * batch_size: (b + 1) * batch_size]
        tokens, valid = _pad_rows([data.ids[i] for i in idx], pad_id)
        s_pos = _completion_positions([data.masks[i] for i in idx])
        t_pos = (s_pos if data.teacher_ids is None else
                 _completion_positions([data.teacher_masks[i] for i in idx]))
        n_k = [min(len(a), len(b)) for a, b in zip(s_pos, t_pos)]
        k = next((x for x in BUCKETS if x >= max(n_k)), max(n_k))
        pos = np.zeros((2, len(idx), k), np.int32)
        k_mask = np.zeros((len(idx), k), np.int32)
        for r, n in enumerate(n_k):
            pos[0, r, :n], pos[1, r, :n], k_mask[r, :n] = s_pos[r][:n], t_pos[r][:n], 1
        teacher = {}
        if data.teacher_ids is not None:
            t_tokens, t_valid = _pad_rows([data.teacher_ids[i] for i in idx], pad_id)
            teacher = dict(t_inputs_bt=t_tokens[:, :-1], t_valid_bt=t_valid[:, :-1],
                           t_pos_bk=pos[1])
        yield Batch(inputs_bt=tokens[:, :-1], targets_bt=tokens[:, 1:], valid_bt=valid[:, :-1],
                    s_pos_bk=pos[0], k_mask_bk=k_mask, **teacher)
