"""CIDEr-D in process: coco-caption's arithmetic without Java, fast enough to be
a reward.

Two uses, one scorer:

- validation during training: `CiderD().compute_score(gts, res)` takes its
  document frequencies from the evaluated set's own references, exactly as
  coco-caption (and so the course's `p2_evaluate.py`) does;
- self-critical training: `CiderD(train_refs).score_candidates(keys, caps)`
  takes them from a fixed corpus (the training set) and caches each key's
  reference vectors, so thousands of calls stay cheap.

The metric (Vedantam et al. 2015, "CIDEr-D" as coded in coco-caption's
`cider_scorer.py`): every caption becomes, for each n in 1..4, a vector of
n-gram weights tf * (log N - log max(1, df)), N the number of reference sets
and df the number of sets whose references contain the n-gram. A candidate
scores against each reference, per n,

    sum_g min(c_g, r_g) * r_g / (|c| * |r|)   (0 when a norm is 0)

times exp(-(l_c - l_r)^2 / (2 sigma^2)); the per-n scores are averaged over
the references and over n, then multiplied by 10. Note two quirks kept for
compatibility: l is the number of *bigrams* (words - 1, and 0 for an empty
caption), and the norms include n-grams absent from every reference.

A single evaluated image always scores 0 with corpus-free document
frequencies: N = 1 and every reference n-gram has df = 1, so every weight
that could match is log 1 - log 1 = 0.

Inputs are tokenised text (space-separated lower-case tokens); `tokenize`
produces them from raw captions the way coco-caption's Java PTB tokenizer
does for caption-like text.
"""
from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

# ---------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------

# Tokens coco-caption's PTBTokenizer wrapper drops after tokenising. It
# compares them after Java's -lowerCase, so the bracket escapes it lists in
# upper case (-LRB- ...) never match: "(" survives as "-lrb-".
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])

# Abbreviations whose period Stanford's PTBTokenizer (CoreNLP 3.4.1, the jar
# coco-caption ships) keeps attached, measured on that jar ("st." stays
# "st.", "sat." becomes "sat ."). "no." keeps its period only before a number.
_ABBREVIATIONS = (
    "mr", "mrs", "ms", "dr", "st", "mt", "jr", "sr", "vs", "etc", "ave", "co", "inc",
    "ltd", "prof", "gen", "capt", "lt", "col", "sgt", "rev", "hon", "ft", "jan", "feb",
    "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "mon", "tue",
    "wed", "thu", "fri", "blvd", "rd", "dept", "est", "corp", "bros", "sq", "pres", "adm",
    "gov", "sen", "rep", "cf", "calif",
)

# Characters Java's tokenizer rewrites before lowercasing: the apostrophe
# forms it reads as an apostrophe (so "don’t" splits as "don't" does), dashes,
# the ellipsis (CP1252's included) and the quote entity (case-sensitive there).
_CHAR_MAP = {
    "\u2019": "'", "\u0092": "'",
    "\u2013": "--", "\u2014": "--", "\u2015": "--", "\u0096": "--", "\u0097": "--",
    "\u2026": " ... ", "\u0085": " ... ", "&quot;": '"',
}
_CHAR_RE = re.compile("|".join(re.escape(c) for c in _CHAR_MAP))
# Characters Java's tokenizer deletes, measured on the jar one code point at a
# time ("x <c> y" -> "x y") in the blocks caption text draws on: controls,
# spaces, zero-width and bidi marks, dots leaders, most general punctuation
# after U+2044, currency signs it does not know (the rupee), number forms
# other than the vulgar fractions, CJK punctuation, private use, variation
# selectors, and everything outside the Basic Multilingual Plane (emoji).
# U+2010 and U+2011 are deleted only alone: inside a word they are hyphens.
_DROPPED_RE = re.compile(
    "[\x00-\x08\x0e-\x1f\x7f\x81-\x84\x86-\x90\x95\x98-\x9f\u2000-\u200f\u2012\u2024\u2025\u2027"
    "\u202a-\u202f\u203c\u203d\u2043\u2045-\u206f\u2072\u2073\u208f\u209d-\u209f\u20a1-\u20a3"
    "\u20a5-\u20ab\u20ad-\u20ff\u2150-\u2152\u215f-\u2182\u2185-\u218f\u3000\u3003\u3004"
    "\u3007-\u3011\u3013-\u3030\u3036-\u303a\u303d-\u303f\ue000-\uf8ff\ufe00-\ufe6f\ufeff"
    "\U00010000-\U0010ffff]"
    "|(?<![^\\W_])[\u2010\u2011]|[\u2010\u2011](?![^\\W_])"
)

# Single characters Java rewrites as tokens: brackets become -LRB- ...
# (lower-cased by -lowerCase); quotes of fixed direction become `` '' ` '
# (all dropped later); the vulgar fractions it knows become n/m; currency
# signs become PTB's $ and # (and "cents").
_OTHER = {
    "(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-",
    '"': "''", "\u201c": "``", "\u00ab": "``", "\u201d": "''", "\u00bb": "''",
    "\u2018": "`", "\u201b": "`", "\u2039": "`", "\u203a": "'",
    "\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3",
    "\u00a2": "cents", "\u00a3": "#", "\u00a4": "$", "\u20a0": "$", "\u20ac": "$", "\u0080": "$",
    "\u0091": "`", "\u0093": "``", "\u0094": "''",  # CP1252 quotes and euro read as Latin-1
}
# HTML entities Java reads (case-insensitive), as the token each becomes;
# None: no token (a space).
_ENTITIES = {"&amp;": "&", "&lt;": "<", "&gt;": ">", "&nbsp;": None,
             "&mdash;": "--", "&ndash;": "--", "&md;": "--"}

# Words Java splits in two (case-insensitive, whole word).
_SPLIT_WORDS = {"cannot": 3, "gonna": 3, "gotta": 3, "wanna": 3, "gimme": 3, "lemme": 3}

# A character of a word for Java: a letter or a decimal digit (not "_", not
# superscripts or vulgar fractions, which Python's \w includes), a soft
# hyphen (deleted from the word afterwards), or a combining mark of the
# ranges Java's word rule lists (measured: "cafe\u0301" stays one word).
_NOT_WORD = "_\u00b2\u00b3\u00b9\u00bc-\u00be\u2070-\u209f\u2150-\u218f\u2460-\u24ff\u2776-\u2793"
_MARKS = ("\u00ad\u0300-\u036f\u0483-\u0487\u0591-\u05bd\u05bf\u05c1\u05c2\u05c4\u05c5\u05c7"
          "\u0615-\u061a\u064b-\u065e\u0670\u06d6-\u06dc\u06df-\u06e4\u06e7\u06e8\u06ea-\u06ed"
          "\u0711\u0730-\u074a\u07a6-\u07b0\u07eb-\u07f3\u0900-\u0903\u093c\u093e-\u094e"
          "\u0951-\u0955\u0962\u0963\u0981-\u0983\u09bc\u09be-\u09c4\u09c7\u09c8\u09cb-\u09cd"
          "\u09d7\u09e2\u09e3\u0a01-\u0a03\u0a3c\u0a3e-\u0a42\u0a47\u0a48\u0a4b-\u0a4d"
          "\u0a81-\u0a83\u0abc\u0abe-\u0ac5\u0ac7-\u0ac9\u0acb-\u0acd\u0b82\u0bbe-\u0bc2"
          "\u0bc6-\u0bc8\u0bca-\u0bcd\u0c01-\u0c03\u0c3e-\u0c44\u0c46-\u0c48\u0c4a-\u0c4d"
          "\u0c55\u0c56\u0d3e-\u0d44\u0d46-\u0d48\u0e31\u0e34-\u0e3a\u0e47-\u0e4e\u0eb1"
          "\u0eb4-\u0ebc\u0ec8-\u0ecd\u1885\u1886")
_W = f"(?:[^\\W{_NOT_WORD}]|[{_MARKS}])"

# One alternative per token class, tried in order at each token start (Python's
# alternation is first-match, so specific classes come before `word`; Java's
# lexer takes the longest match, which the order and lookaheads reproduce).
_TOKEN_RE = re.compile(
    r"""
    (?P<plain>[A-Za-z]+(?=\ |$))                    # most tokens: no other class can start here
  | (?P<angles><<|>>)
  | (?P<tag></?[A-Za-z!][^>]*>)                      # <b>, </a>, <a href="x">: one token
  | (?P<entity>(?i:&(?:amp|lt|gt|nbsp|mdash|ndash|md);))
  | (?P<special>(?i:'t(?=(?:is|was)(?!\w))|y'(?=all(?!\w))|'n'|ma'am|c'mon|'em(?!\w)|'cause(?!\w)|'till?))
  | (?P<url>(?i:https?|ftp)://\S*[\w/])
  | (?P<acronym>(?:[A-Za-z]\.){2,}(?!\w))             # u.s.  a.m.  e.g.
  | (?P<initial>[A-Za-z]\.(?!\w))                     # "plan b." keeps "b."
  | (?P<abbrev>(?i:""" + "|".join(_ABBREVIATIONS) + r""")\.(?!\w))
  | (?P<number_abbrev>(?i:no)\.(?=\s*\d))
  | (?P<quotes>''|``)
  | (?P<clitic>(?i:'(?:s|m|d|ll|re|ve|n))(?!\w))     # man's -> man 's
  | (?P<year>(?<!\w)'\d\d(?:(?i:s)(?!\w)|(?=\s|$)))    # '90s '07
  | (?P<open_single>'(?=[A-Za-z][^ \t\u00a0]))       # 'quoted -> ` quoted
  | (?P<open_double>"(?=[A-Za-z0-9$]))               # "quoted -> `` quoted
  | (?P<nt_stem>[^\W\d_]*[^\W\d_nN](?=(?i:n't)(?!\w)))  # don't -> do n't
  | (?P<nt>(?i:n't)(?!\w))
  | (?P<hashtag>[#@][^\W\d_]\w*)                     # #tag @user
  | (?P<fraction>(?:\d{1,4}[- \u00a0])?\d{1,4}(?:\\?/|\u2044)\d{1,4}(?![\w/\u2044]))  # 3 1/2: one token
  | (?P<subsup>[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+))
  | (?P<signed>(?<![\w-])-\d+(?:[.,]\d+)*|\+\d+(?:[.,]\d+)*)  # -3.5 +5; "-3-year-old" -> -3 - year-old
  | (?P<dollar>[A-Z]+\$)                             # US$ (upper case only: "a$" is a $)
  | (?P<word>(?:[OoDdLl]'(?=[^\W\d_]))?WORDCHAR+
        (?:(?:[-./@_\u2010\u2011]|(?<=[^\W\d_])[!?]|(?<=\d)[,:](?=\d)|(?<=[A-Z])&(?=[A-Z]))WORDCHAR+)*
        (?:\.(?=[,;:]))?)                             # "dog.," keeps "dog."
  | (?P<ellipsis>\.{3,5}|(?:\.[ \u00a0]){2,4}\.)     # ... and . . .; six dots are ... .
  | (?P<decimal>[.,:]\d+(?:[.,:]\d+)*)              # ,000 .5: Java's number rule allows them
  | (?P<dashes>-{2,})
  | (?P<exclaim>[?!]{2,})                             # "?!" stays one (kept) token
  | (?P<repeated>\*+|_+|\#+|@+)
  | (?P<other>\S)
    """.replace("WORDCHAR", _W),
    re.VERBOSE,
)
_DECIMAL_UNIT_RE = re.compile(r"(\d+(?:[.,:]\d+)+)([^\W\d_]\w*)")  # 1.5x -> 1.5 x


def _ptb_tokens(text: str) -> list[str]:
    """PTB-style tokens of one line, before lowercasing and punctuation removal."""
    text = _DROPPED_RE.sub(" ", _CHAR_RE.sub(lambda m: _CHAR_MAP[m.group()], text))
    tokens = []
    for match in _TOKEN_RE.finditer(text):
        kind, token = match.lastgroup, match.group()
        if kind in ("plain", "word"):
            # a soft hyphen vanishes from a word; soft hyphens alone are a hyphen
            token = token.replace("\u00ad", "") or "-"
            split = _SPLIT_WORDS.get(token.lower())
            unit = _DECIMAL_UNIT_RE.fullmatch(token)
            if token.endswith(".") and any(c in ".,:/" for c in token[:-1]):
                tokens += [token[:-1], "."]  # "3.5.," -> 3.5 . , but "10.," -> 10. ,
            elif split:
                tokens += [token[:split], token[split:]]
            elif unit:
                tokens += [unit.group(1), unit.group(2)]
            else:
                tokens.append(token)
        elif kind in ("tag", "fraction"):
            tokens.append(token.replace(" ", "\u00a0"))  # Java's normalizeSpace
        elif kind == "entity":
            if _ENTITIES[token.lower()] is not None:
                tokens.append(_ENTITIES[token.lower()])
        elif kind == "ellipsis":
            tokens.append("...")
        elif kind == "dashes":
            tokens.append("--" if len(token) <= 4 else token)
        elif kind == "open_single":
            tokens.append("`")
        elif kind == "open_double":
            tokens.append("``")
        elif kind == "other":
            tokens.append(_OTHER.get(token, token))
        else:
            tokens.append(token)
    return tokens


def tokenize(caption: str) -> str:
    """A caption as coco-caption scores it: PTB tokens, lower-cased, punctuation gone.

    An in-process stand-in for `pycocoevalcap.tokenizer.ptbtokenizer`
    (Stanford PTBTokenizer -preserveLines -lowerCase, then the PUNCTUATIONS
    tokens removed), e.g. "A man's dog doesn't run." -> "a man 's dog does n't run".
    Its rules were measured on the jar coco-caption ships, and
    tests/test_cider.py compares its tokens with the jar's one by one on a
    corpus of tricky text. It agrees on caption text: clitics ('s 're 'm
    n't, "cannot" -> "can not", "gonna" -> "gon na"), hyphenated words,
    numbers (1,000 3.5 3:30 -3 +5), fractions ("3½" -> "3 1/2", "3 1/2"
    one token with a no-break space), acronyms and common abbreviations
    (u.s. p.m. st. mr. "b."), quotes of every kind (dropped), brackets
    (kept as -lrb- -rrb- ..., because the drop list is upper case and Java
    lower-cases first), "?!" (kept), $ % & / #tags, dashes, ellipses,
    soft hyphens (deleted inside words), combining accents (kept in the
    word), "_" (its own token unless it joins two words: "_UNK" -> "_ unk"),
    HTML-like tags (one token each) and entities, and the characters Java
    deletes (emoji, variation selectors, zero-width and bidi marks...).

    Known differences, none in text that captions or captioning models
    produce: tests/ptb_corpus.py's KNOWN_DIFFERENCES ("c++", "v2.0",
    emoticons, phone numbers...), rarer clitic forms ("can'ts",
    "gonna's", "3.5n't"), URLs other than http(s)/ftp, abbreviations
    CoreNLP knows beyond the list above, letters and symbols newer than
    the jar's Unicode tables or outside the blocks measured for deletion,
    and Unicode whose lower-casing or whitespace class differs between
    Java and Python.
    """
    lowered = (token.lower() for token in _ptb_tokens(caption))
    return " ".join(t for t in lowered if t not in PUNCTUATIONS)


# ---------------------------------------------------------------------------
# CIDEr-D
# ---------------------------------------------------------------------------


def _ngram_counts(caption: str, n: int) -> list[Counter]:
    """Counts of the k-grams of a tokenised caption for k = 1..n, k-grams as tuples."""
    words = caption.split()
    return [Counter(zip(*(words[i:] for i in range(k)))) for k in range(1, n + 1)]


def _bigram_count(counts: list[Counter]) -> int:
    """coco-caption's caption length: its number of bigrams (0 when n = 1)."""
    return sum(counts[1].values()) if len(counts) > 1 else 0


class _Idf:
    """log N - log max(1, df) for every n-gram, N the number of reference sets.

    A table holds the n-grams of the corpus (df >= 1); any other n-gram has
    df = 0 and so weight log N.
    """

    def __init__(self, counts_per_set, num_sets: int):
        df = Counter()
        for counts_of_refs in counts_per_set:  # one set: the references of one key
            df.update(set().union(*(c for ref in counts_of_refs for c in ref)))
        self.log_n = math.log(float(num_sets))
        self.table = {gram: self.log_n - math.log(d) for gram, d in df.items()}


class _RefSet:
    """The references of one key as dense tf-idf rows over their own n-grams.

    R has one row per reference and one column per n-gram seen in any of
    them; `onehot` maps a column to its order (n-1); norms are per reference
    and order; lengths count bigrams, as coco-caption's do.
    """

    def __init__(self, counts_of_refs: list[list[Counter]], idf: _Idf, n: int):
        self.column = {}
        order = []
        for ref in counts_of_refs:
            for k, counts in enumerate(ref):
                for gram in counts:
                    if gram not in self.column:
                        self.column[gram] = len(order)
                        order.append(k)
        V = len(order)
        self.R = np.zeros((len(counts_of_refs), V))  # (refs, V)
        weight = idf.table.get
        for i, ref in enumerate(counts_of_refs):
            for counts in ref:
                for gram, tf in counts.items():
                    self.R[i, self.column[gram]] = tf * weight(gram, idf.log_n)
        self.onehot = np.zeros((V, n))  # (V, n)
        self.onehot[np.arange(V), order] = 1.0
        self.norm = np.sqrt((self.R ** 2) @ self.onehot)  # (refs, n)
        self.length = np.array([_bigram_count(ref) for ref in counts_of_refs], dtype=np.float64)


class CiderD:
    """coco-caption's CIDEr-D, vectorised per key.

    references: when given (key -> tokenised reference captions), document
    frequencies and N come from them once and for all (self-critical
    training: the training set), and `score_candidates` can be used.
    Otherwise every `compute_score` call takes them from its own `gts`, which
    is what coco-caption does.
    """

    def __init__(self, references: dict | None = None, n: int = 4, sigma: float = 6.0):
        self.n = n
        self.sigma = sigma
        self.references = None
        self._idf = None
        self._cache = {}
        if references is not None:
            _check_references(references)
            self.references = references
            counts = ([_ngram_counts(r, n) for r in refs] for refs in references.values())
            self._idf = _Idf(counts, len(references))

    def _scores(self, refset: _RefSet, candidates: list[str], idf: _Idf) -> np.ndarray:
        """CIDEr-D of each candidate against one key's references, shape (C,)."""
        C, V = len(candidates), len(refset.column)
        H = np.zeros((C, V))  # (C, V): candidate weights on the references' n-grams
        hyp_sq = np.zeros((C, self.n))  # squared norms, over all the candidate's n-grams
        hyp_len = np.zeros(C)
        weight, column = idf.table.get, refset.column.get
        for c, text in enumerate(candidates):
            counts = _ngram_counts(text, self.n)
            cols, weights = [], []
            for k, grams in enumerate(counts):
                sq = 0.0
                for gram, tf in grams.items():
                    w = tf * weight(gram, idf.log_n)
                    sq += w * w
                    j = column(gram)
                    if j is not None:
                        cols.append(j)
                        weights.append(w)
                hyp_sq[c, k] = sq
            H[c, cols] = weights
            hyp_len[c] = _bigram_count(counts)
        # clipped products: (C, 1, V) with (1, refs, V) -> (C, refs, V), summed per order -> (C, refs, n)
        R = refset.R[None]
        dot = (np.minimum(H[:, None, :], R) * R) @ refset.onehot
        denom = np.sqrt(hyp_sq)[:, None, :] * refset.norm[None]  # (C, refs, n)
        # coco-caption divides only when both norms are non-zero; the product is 0 otherwise
        val = np.divide(dot, denom, out=np.zeros_like(dot), where=denom != 0)
        delta = hyp_len[:, None] - refset.length[None, :]  # (C, refs)
        val = val * np.exp(-(delta ** 2) / (2 * self.sigma ** 2))[..., None]
        return val.sum(axis=1).mean(axis=1) / len(refset.length) * 10.0

    def compute_score(self, gts: dict, res: dict):
        """Mean CIDEr-D and the per-key scores, keys in sorted order.

        gts: key -> list of tokenised references; res: key -> tokenised
        candidate (a one-element list, coco-caption's format, is accepted).
        Returns (mean, numpy array aligned with sorted(gts)).
        """
        _check_references(gts)
        if set(gts) != set(res):
            missing, extra = set(gts) - set(res), set(res) - set(gts)
            raise ValueError(f"res keys differ from gts keys: {len(missing)} missing, {len(extra)} extra")
        keys = sorted(gts)
        if not keys:
            raise ValueError("nothing to score: gts is empty")
        ref_counts = {k: [_ngram_counts(r, self.n) for r in gts[k]] for k in keys}
        idf = self._idf if self._idf is not None else _Idf(ref_counts.values(), len(keys))
        scores = np.empty(len(keys))
        for i, k in enumerate(keys):
            scores[i] = self._scores(_RefSet(ref_counts[k], idf, self.n), [_candidate(res[k], k)], idf)[0]
        return float(scores.mean()), scores

    def score_candidates(self, keys: list, candidates: list[str]) -> np.ndarray:
        """CIDEr-D of candidates[i] against references[keys[i]], shape (len(keys),).

        Keys may repeat (several samples per image): each key's references
        are vectorised once, on first use, and kept.
        """
        if self.references is None:
            raise ValueError("score_candidates needs CiderD(references=...) for its document frequencies")
        if len(keys) != len(candidates):
            raise ValueError(f"{len(keys)} keys but {len(candidates)} candidates")
        idf = self._idf
        rows = {}
        for i, k in enumerate(keys):
            rows.setdefault(k, []).append(i)
        out = np.zeros(len(keys))
        for k, idx in rows.items():
            refset = self._cache.get(k)
            if refset is None:
                if k not in self.references:
                    raise KeyError(f"key {k!r} has no references")
                counts = [_ngram_counts(r, self.n) for r in self.references[k]]
                refset = self._cache[k] = _RefSet(counts, idf, self.n)
            out[idx] = self._scores(refset, [candidates[i] for i in idx], idf)
        return out


def _candidate(value, key) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    raise ValueError(f"candidate for key {key!r} must be a string, got {value!r}")


def _check_references(refs: dict) -> None:
    for key, value in refs.items():
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(r, str) for r in value):
            raise ValueError(f"references for key {key!r} must be a non-empty list of strings")
