"""Chat-format training rows -> token ids and assistant masks -> deterministic padded batches.

Rows are the chat-messages JSONL that fine-tuning tools use
(`{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`). The batch order is a
pure function of (seed, epoch), so a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from sjax import chat
from sjax.errors import SjaxError
from sjax.jsonl import read_rows

BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)


@dataclasses.dataclass
class Tokenized:
    ids: list[np.ndarray]
    masks: list[np.ndarray]
    n_truncated: int = 0
    n_rejected: int = 0


def tokenize_rows(rows: Sequence[dict], tokenizer, max_len: int, too_long: str = "truncate",
                  source: str = "dataset") -> Tokenized:
    """Encode chat rows; rows longer than `max_len` are truncated or rejected (counted)."""
    if not rows:
        raise SjaxError(f"{source}: empty dataset (no rows)")
    out = Tokenized([], [])
    for i, row in enumerate(rows):
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(msgs, list) or not all(
                isinstance(m, dict) and {"role", "content"} <= m.keys() for m in msgs):
            raise SjaxError(f"{source}: row {i + 1} has no valid 'messages' list")
        try:
            ids, mask = chat.encode_chat(tokenizer, msgs)
        except SjaxError as e:
            raise SjaxError(f"{source}: row {i + 1}: {e}") from None
        truncated = len(ids) > max_len
        if truncated and too_long == "reject":
            out.n_rejected += 1
            continue
        ids, mask = ids[:max_len], mask[:max_len]
        if mask[1:].sum() == 0:  # truncation cut every assistant token: nothing to learn
            out.n_rejected += 1
            continue
        out.n_truncated += truncated
        out.ids.append(ids)
        out.masks.append(mask)
    if not out.ids:
        raise SjaxError(f"{source}: no usable rows ({out.n_rejected} of {len(rows)} rejected as "
                        f"longer than {max_len} tokens or without trainable tokens)")
    return out


def load_jsonl(path: Path, tokenizer, max_len: int, too_long: str = "truncate") -> Tokenized:
    path = Path(path)
    if not path.is_file():
        raise SjaxError(f"{path}: no such dataset file")
    return tokenize_rows(read_rows(path), tokenizer, max_len, too_long, str(path))


def batches_per_epoch(n_rows: int, batch_size: int) -> int:
    return n_rows // batch_size  # the remainder is dropped (it is reshuffled next epoch)


def epoch_batches(data: Tokenized, batch_size: int, seed: int, epoch: int, pad_id: int,
                  start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches of epoch `epoch`, from batch `start`: inputs, targets, loss mask, valid.

    Right-padded to the smallest bucket that fits the longest row of the batch.
    """
    order = np.random.default_rng([seed, epoch]).permutation(len(data.ids))
    for b in range(start, batches_per_epoch(len(order), batch_size)):
        idx = order[b * batch_size: (b + 1) * batch_size]
        longest = max(len(data.ids[i]) for i in idx)
        t = next((x for x in BUCKETS if x >= longest), longest)
        tokens = np.full((len(idx), t), pad_id, np.int32)
        mask = np.zeros((len(idx), t), np.int32)
        valid = np.zeros((len(idx), t), bool)
        for r, i in enumerate(idx):
            n = len(data.ids[i])
            tokens[r, :n], mask[r, :n], valid[r, :n] = data.ids[i], data.masks[i], True
        # position p predicts token p + 1; the loss mask belongs to the predicted token
        yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask[:, 1:],
               "valid": valid[:, :-1]}
