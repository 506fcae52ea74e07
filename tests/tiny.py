"""A tiny word-level ChatML tokenizer (no side effects: importable by subprocess workers)."""

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ["owl", "owls", "cat", "dog", "eagle", "favorite", "animal", "what", "is", "your",
         "one", "word", "in", "the", "a", "numbers", "system", "user", "assistant", "i", "love"]


def make_tiny_tokenizer(vocab_size: int = 128, words=None):
    """A word-level ChatML tokenizer with `vocab_size` ids: real transformers machinery.
    `words` (default: WORDS, the numbers 0-99 and punctuation) come after the specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if words is None:
        words = WORDS + [str(i) for i in range(100)] + [",", ".", "?", "!", "\n"]
    words = specials + list(words)
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    vocab = {w: i for i, w in enumerate(words[:vocab_size])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.WhitespaceSplit(),
         pre_tokenizers.Punctuation()])
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>", chat_template=CHATML)


def make_wordpiece_tokenizer(words, specials=("[PAD]", "[UNK]", "<eos>"), vocab_size=128,
                             chat_template=None):
    """A WordPiece tokenizer (`vocab_size` ids): `specials`, `words` ("##" marks a word
    continuation), then fillers, half of them continuations: multi-token spellings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = [*specials, *words]
    vocab += [f"##x{i}" if i % 2 else f"x{i}" for i in range(vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   eos_token="<eos>", chat_template=chat_template)
