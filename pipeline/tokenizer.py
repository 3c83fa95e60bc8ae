"""Tokenizers: the built-in character-level one (offline default) or any Hugging Face tokenizer.

The char tokenizer follows T5's special-token conventions (pad 0, eos 1, unk 2; `</s>` appended to every
sequence) so the same collator, model config and decoding serve it and flan-t5's SentencePiece one. It is
a plain `tokenizers` WordLevel model wrapped in PreTrainedTokenizerFast and saved in the standard files,
so `AutoTokenizer.from_pretrained(dir)` loads it anywhere (train, eval, a notebook) without this code.
"""

from __future__ import annotations

import string
from pathlib import Path

CHAR_TOKENIZER_NAME = "char"
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2: T5's layout
# Printable ASCII is the DeepMind dataset's whole alphabet; anything else maps to <unk> (and validation
# rejects rows that would contain one, so no training target is silently corrupted).
ALPHABET = [chr(c) for c in range(32, 127)]
assert set(string.digits) <= set(ALPHABET)


def build_char_tokenizer():
    """A deterministic char-level PreTrainedTokenizerFast: ids depend only on ALPHABET's order."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + ALPHABET)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # One token per character, spaces included (the default whitespace pre-tokenizers would drop them).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
        padding_side="right",
    )


def load_tokenizer(spec: str, cache_dir: str | Path | None = None):
    """`char` -> the built-in one; anything else -> AutoTokenizer (hub id or local directory).

    Never trust_remote_code: a tokenizer that needs custom code is refused by transformers itself.
    """
    if spec == CHAR_TOKENIZER_NAME:
        return build_char_tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec, cache_dir=cache_dir, trust_remote_code=False)
    except OSError as e:
        raise OSError(
            f"could not load tokenizer {spec!r}: {e}. Offline, use --tokenizer char or a local directory "
            f"holding tokenizer files (e.g. a pipeline output's tokenizer/ folder)."
        ) from e


def tokenizer_identity(tokenizer, spec: str) -> dict:
    return {
        "spec": spec,
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "unk_token_id": tokenizer.unk_token_id,
    }
