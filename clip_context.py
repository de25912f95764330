"""Captions cut to fit CLIP's text context, the one rule for both ends of Problem 2.

CLIPScore encodes each caption with CLIP's text tower, whose context holds 77
tokens, its start and end tokens included; the course's scoring script
crashes on a longer caption. `p2_inference.py` cuts the captions it writes
with `fit_clip_context`, and `p2_evaluate.py` cuts the captions it is given the
same way before scoring them.
"""
from __future__ import annotations

import functools

CLIP_CONTEXT = 77  # tokens, CLIP's start and end tokens included


@functools.lru_cache(maxsize=None)
def _tokenizer():
    from clip.simple_tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def clip_length(text: str) -> int:
    """CLIP tokens `clip.tokenize(text)` takes, start and end tokens included."""
    return len(_tokenizer().encode(text)) + 2


def fit_clip_context(text: str, context: int = CLIP_CONTEXT) -> str:
    """`text` less the words at its end that do not fit `context` CLIP tokens.

    A caption of 30 GPT-2 tokens is normally far below 77 CLIP tokens, but one
    GPT-2 token can hold many bytes that CLIP spends a token each on. A single
    word too long to fit loses characters instead.
    """
    while clip_length(text) > context:
        text = text.rsplit(" ", 1)[0] if " " in text else text[:-1]
    return text
