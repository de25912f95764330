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


@functools.lru_cache(maxsize=None)
def _longest_token() -> int:
    """Bytes of the longest piece of text one CLIP token stands for (32), its end-of-word mark aside."""
    return max(len(t[:-4] if t.endswith("</w>") else t) for t in _tokenizer().encoder)


def clip_length(text: str) -> int:
    """CLIP tokens `clip.tokenize(text)` takes, start and end tokens included."""
    return len(_tokenizer().encode(text)) + 2


def _tokens_within(text: str, limit: int) -> int:
    """The CLIP tokens of `text` (start and end aside), counted as `clip.tokenize` counts them, or a
    number over `limit` as soon as the count passes it.

    Linear in the text. CLIP's tokenizer cleans the text, splits it into pieces (words, digits,
    punctuation runs) and runs BPE over each piece, in time quadratic in the piece's length; a piece
    longer than `limit` tokens of the longest kind can never fit, so it is not run through BPE at all.
    """
    from clip.simple_tokenizer import basic_clean, whitespace_clean

    tokenizer, count = _tokenizer(), 0
    for piece in tokenizer.pat.findall(whitespace_clean(basic_clean(text)).lower()):
        encoded = "".join(tokenizer.byte_encoder[b] for b in piece.encode("utf-8"))
        if len(encoded) > (limit - count) * _longest_token():
            return limit + 1
        count += len(tokenizer.bpe(encoded).split(" "))
        if count > limit:
            break
    return count


def _longest_prefix(word: str, limit: int) -> str:
    """The longest prefix of `word` within `limit` CLIP tokens: lengths doubled until one does not
    fit, then bisected, so only prefixes about as long as the answer are tokenized."""
    fits, fails = 0, 1  # a prefix length that fits, one that does not (or the end of the word)
    while fails <= len(word) and _tokens_within(word[:fails], limit) <= limit:
        fits, fails = fails, 2 * fails
    fails = min(fails, len(word))
    while fails - fits > 1:
        middle = (fits + fails) // 2
        if _tokens_within(word[:middle], limit) <= limit:
            fits = middle
        else:
            fails = middle
    return word[:fits]


def fit_clip_context(text: str, context: int = CLIP_CONTEXT) -> str:
    """`text` less the words at its end that do not fit `context` CLIP tokens.

    A caption of 30 GPT-2 tokens is normally far below 77 CLIP tokens, but one
    GPT-2 token can hold many bytes that CLIP spends a token each on. A single
    word too long to fit loses characters instead (its longest prefix that fits).
    Each word is tokenized once, and no more of a word than could fit: the time
    is linear in the caption, however long.
    """
    limit = context - 2  # the start and end tokens
    words = text.split(" ")
    used = 0
    for i, word in enumerate(words):
        used += _tokens_within(word, limit - used)
        if used > limit:
            return " ".join(words[:i]) if i else _longest_prefix(word, limit)
    return text
