"""Chat messages -> token ids with the model's own template; assistant-only loss masks.

The mask is found by rendering growing prefixes of the conversation, so it works for any
template without `{% generation %}` markers: the tokens an assistant turn adds (its content
through its end-of-turn token, not the template's trailing newline) are the trained ones.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from sjax.errors import SjaxError

Message = dict[str, str]


def messages(user: str, system: str = "", assistant: str | None = None) -> list[Message]:
    out = [{"role": "system", "content": system}] if system else []
    out.append({"role": "user", "content": user})
    if assistant is not None:
        out.append({"role": "assistant", "content": assistant})
    return out


def render(tokenizer, msgs: Sequence[Message], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(msgs), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of already-rendered template text (special tokens are in the text)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer, msgs: Sequence[Message]) -> list[int]:
    """Ids of a conversation ending in a user turn, plus the assistant generation prompt."""
    return encode(tokenizer, render(tokenizer, msgs, add_generation_prompt=True))


def encode_chat(tokenizer, msgs: Sequence[Message]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, loss_mask) of a whole conversation; mask is 1 on assistant tokens only."""
    if not any(m["role"] == "assistant" for m in msgs):
        raise SjaxError("chat row has no assistant turn")
    ids = np.asarray(encode(tokenizer, render(tokenizer, msgs, add_generation_prompt=False)))
    mask = np.zeros(len(ids), np.int32)
    end_ids = {i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))
               if isinstance(i, int) and i >= 0}
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = len(encode(tokenizer, render(tokenizer, msgs[:i], add_generation_prompt=True)))
        stop = len(encode(tokenizer, render(tokenizer, msgs[: i + 1], add_generation_prompt=False)))
        turn = ids[start:stop]
        ends = [j for j, t in enumerate(turn) if int(t) in end_ids]
        if ends:  # keep the end-of-turn token, drop the template's separator after it
            stop = start + ends[-1] + 1
        mask[start:stop] = 1
    return ids, mask


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, or 0 when it has none (padding is masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None,
             buckets: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad to `length`, else to the smallest bucket that fits, else to the longest row.

    Returns (tokens_bt int32, valid_bt bool). Left padding keeps every row's last prompt
    token in the last column, so one decode step serves the whole batch.
    """
    if not seqs:
        raise SjaxError("left_pad: empty batch")
    longest = max(len(s) for s in seqs)
    if length is None:
        length = next((b for b in sorted(buckets) if b >= longest), longest)
    if longest > length:
        raise SjaxError(f"left_pad: a row of {longest} tokens exceeds the length {length}")
    tokens = np.full((len(seqs), length), pad_id, np.int32)
    valid = np.zeros((len(seqs), length), bool)
    for r, s in enumerate(seqs):
        if len(s):
            tokens[r, length - len(s):] = s
            valid[r, length - len(s):] = True
    return tokens, valid
