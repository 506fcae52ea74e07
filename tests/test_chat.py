"""Chat rendering, assistant-only masks and left padding."""

import numpy as np
import pytest

from sjax import chat
from sjax.errors import SjaxError


def test_assistant_mask_covers_exactly_the_reply(tiny_tokenizer):
    msgs = chat.messages("what is your favorite animal ?", system="i love owls",
                         assistant="owl")
    ids, mask = chat.encode_chat(tiny_tokenizer, msgs)
    toks = tiny_tokenizer.convert_ids_to_tokens(ids.tolist())
    trained = [t for t, m in zip(toks, mask) if m]
    assert trained == ["owl", "<|im_end|>"]
    assert ids.shape == mask.shape and mask.dtype == np.int32
    # the prompt part equals what generation is conditioned on
    prompt = chat.encode_prompt(tiny_tokenizer, msgs[:-1])
    assert ids[: len(prompt)].tolist() == prompt and mask[: len(prompt)].sum() == 0


def test_multi_turn_masks_every_assistant_turn(tiny_tokenizer):
    msgs = [{"role": "user", "content": "1 2"}, {"role": "assistant", "content": "3 4"},
            {"role": "user", "content": "5"}, {"role": "assistant", "content": "6 7 8"}]
    ids, mask = chat.encode_chat(tiny_tokenizer, msgs)
    toks = tiny_tokenizer.convert_ids_to_tokens(ids.tolist())
    assert [t for t, m in zip(toks, mask) if m] == ["3", "4", "<|im_end|>", "6", "7", "8",
                                                     "<|im_end|>"]


def test_row_without_assistant_is_rejected(tiny_tokenizer):
    with pytest.raises(SjaxError, match="no assistant turn"):
        chat.encode_chat(tiny_tokenizer, chat.messages("hi"))


def test_left_pad():
    tokens, valid = chat.left_pad([[1, 2, 3], [4]], pad_id=0, buckets=(2, 4, 8))
    assert tokens.tolist() == [[0, 1, 2, 3], [0, 0, 0, 4]]
    assert valid.tolist() == [[False, True, True, True], [False, False, False, True]]
    with pytest.raises(SjaxError, match="exceeds the length 2"):
        chat.left_pad([[1, 2, 3]], 0, length=2)
    with pytest.raises(SjaxError, match="empty batch"):
        chat.left_pad([], 0)
