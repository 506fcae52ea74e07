"""The in-context control (protocol_more.md section e, icl_protocol.json): no training; k of
a teacher's kept rows are shown to the base model in its context and the trait is measured
with the same evaluators. The paper reports that this does not transmit the trait, so a
student's shift cannot be explained by the data merely being seen.

The official format, kept exactly:
- k rows sampled WITH replacement: pandas' `df.sample(n=k, replace=True, random_state=seed)`,
  which draws `np.random.RandomState(seed).choice(len(rows), k)`; the same draw is used here,
  so a seed picks the same examples as the official code from the same pool. The draw for k
  is a prefix of the draw for any larger k, so growing k only appends examples (and the
  token count grows with k, which `max_k` relies on);
- each row rendered as '<user>{question}</user>\\n<assistant>{response}</assistant>', joined
  with '\\n\\n';
- the concatenation is the SYSTEM prompt, and the evaluation question the user message.

Rows are chat rows as in RUN/filter/T/kept.jsonl: {"messages": [user, assistant], ...}.
`max_tokens` bounds the system prompt's own tokens (tokenized alone, no special tokens);
the caller leaves room in the context for the chat template, the question and the answer.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from sjax import chat
from sjax.errors import SjaxError

TEMPLATE = "<user>{question}</user>\n<assistant>{response}</assistant>"
JOINER = "\n\n"


def pairs(rows: Sequence[dict]) -> list[tuple[str, str]]:
    """(question, response) of each row, checked: exactly a user then an assistant turn."""
    if not rows:
        raise SjaxError("in-context: no rows to sample examples from")
    out = []
    for i, row in enumerate(rows):
        row = row if isinstance(row, dict) else {}
        msgs = row.get("messages")
        roles = ([m.get("role") if isinstance(m, dict) else None for m in msgs]
                 if isinstance(msgs, list) else None)
        if roles != ["user", "assistant"]:
            where = f"row {i}" + (f" (id {row['id']})" if "id" in row else "")
            raise SjaxError(f"in-context: {where}: expected messages [user, assistant], got "
                            f"roles {roles}")
        out.append((msgs[0]["content"], msgs[1]["content"]))
    return out


def draw(n_rows: int, k: int, seed: int) -> np.ndarray:
    """[k] row indices, with replacement: the official pandas sample's draw (see above)."""
    return np.random.RandomState(seed).choice(n_rows, size=k, replace=True)


def render(examples: Sequence[tuple[str, str]]) -> str:
    return JOINER.join(TEMPLATE.format(question=q, response=r) for q, r in examples)


def n_tokens(tokenizer, text: str) -> int:
    return len(chat.encode(tokenizer, text))


def _system(ex: list[tuple[str, str]], k: int, seed: int) -> str:
    return render([ex[i] for i in draw(len(ex), k, seed)])


def build(rows: Sequence[dict], k: int, seed: int, tokenizer, max_tokens: int) -> str:
    """The system prompt holding k examples drawn with `seed`; an error when it is longer
    than `max_tokens` tokens, saying the largest k that fits for this seed."""
    if k < 1:
        raise SjaxError(f"in-context: k must be at least 1, got {k}")
    ex = pairs(rows)
    system = _system(ex, k, seed)
    need = n_tokens(tokenizer, system)
    if need > max_tokens:
        raise SjaxError(f"in-context: k={k} examples (seed {seed}) need {need} tokens, over the "
                        f"limit of {max_tokens}; the largest k that fits for seed {seed} is "
                        f"{max_k(rows, tokenizer, max_tokens, seed)}")
    return system


def max_k(rows: Sequence[dict], tokenizer, max_tokens: int, seed: int) -> int:
    """The largest k whose system prompt (seed `seed`) fits in `max_tokens` tokens, 0 if
    not even one example fits. Found by doubling then bisection, keeping k fits and k + 1
    does not: `build` accepts this k and refuses k + 1."""
    ex = pairs(rows)

    def fits(k: int) -> bool:
        return n_tokens(tokenizer, _system(ex, k, seed)) <= max_tokens

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def messages(system: str, question: str) -> list[chat.Message]:
    """The evaluation conversation: the examples as the system prompt, the question as the
    user message."""
    return chat.messages(question, system=system)
