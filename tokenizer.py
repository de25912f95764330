"""GPT-2's byte-level BPE tokenizer, with the course's `BPETokenizer` API.

Text -> UTF-8 bytes -> one printable unicode character per byte -> split into
pre-tokens (words with their leading space, numbers, punctuation runs,
whitespace) -> BPE merges inside each pre-token -> ids from encoder.json.
`decode` runs the same steps backwards. The ids equal those of
`transformers.GPT2Tokenizer` and tiktoken's "gpt2" encoding (tests check both).

Two things differ from the course's copy, which is not quite GPT-2:
- the byte table leaves byte 0xAD (soft hyphen) out of the printable ranges,
  as GPT-2 does; the course's table maps it twice, so 18 ids could not be
  decoded and any text with "í" or a soft hyphen could not be encoded;
- the pre-tokenisation pattern is GPT-2's own.

The vocabulary files (OpenAI's GPT-2 encoder.json and vocab.bpe) are committed
at the repository root, as in the course's template; $HW3_BPE_DIR may name
another folder (`find_vocab_dir`). Both are checked when
read: a missing, cut-off or mismatched file is an InputError naming it.
"""
from __future__ import annotations

import os

import regex

import file_io
import io_utils
from io_utils import REPO_ROOT

# GPT-2's one special token, as text and as id: it starts and ends every caption.
EOT = "<|endoftext|>"
EOT_ID = 50256

# GPT-2's pre-tokenizer: English contractions (case-sensitive, as in GPT-2),
# then letters, digits or other symbols each with at most one leading space,
# then whitespace. `\s+(?!\S)` leaves the last space of a run to the next word,
# so "a  b" is "a", " ", " b" and " b" is the same token as in "a b".
PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte 0..255 to a printable, non-space character.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls,
    space, 0x7F-0xA0 and the soft hyphen 0xAD) take 256, 257, ... in byte
    order. BPE then never sees whitespace or control characters, and the
    merges file stays plain text.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# What the two files must be: OpenAI's GPT-2 (124M) vocabulary, committed at the repository root.
ENCODER_FILE, MERGES_FILE = "encoder.json", "vocab.bpe"
N_MERGES = EOT_ID - 256  # 256 byte tokens, one token per merge, then <|endoftext|>
FIX = (f"restore the repository's copies (`git checkout -- {ENCODER_FILE} {MERGES_FILE}`) or set HW3_BPE_DIR to a "
       "folder holding both")


_PASSED_OVER = set()  # $HW3_BPE_DIR values find_vocab_dir has warned about


def find_vocab_dir() -> str:
    """The first folder holding both encoder.json and vocab.bpe.

    Looked for in $HW3_BPE_DIR, then next to this file (the repository root,
    where they are committed); a $HW3_BPE_DIR passed over is named in a warning.
    InputError listing the folders when none holds both.
    """
    chosen = os.environ.get("HW3_BPE_DIR")
    candidates = [c for c in (chosen, REPO_ROOT) if c]
    for folder in candidates:
        if all(os.path.isfile(os.path.join(folder, n)) for n in (ENCODER_FILE, MERGES_FILE)):
            if chosen and folder != chosen and chosen not in _PASSED_OVER:
                _PASSED_OVER.add(chosen)  # once per run, though the run looks more than once
                problem = ("is a file, not a folder" if os.path.isfile(chosen) else
                           f"holds no {ENCODER_FILE} and {MERGES_FILE}" if os.path.isdir(chosen) else "does not exist")
                io_utils.warn(f"HW3_BPE_DIR={chosen!r} {problem}; using the GPT-2 vocabulary in {folder!r}")
            return folder
    raise io_utils.InputError(
        f"OpenAI's GPT-2 vocabulary ({ENCODER_FILE} and {MERGES_FILE}) not found in any of: "
        + ", ".join(repr(c) for c in candidates) + f"; {FIX}")


def _not_gpt2(path: str, name: str, problem: str) -> io_utils.InputError:
    return io_utils.InputError(f"{path!r} is not OpenAI's GPT-2 {name}: {problem}; {FIX}")


def _read_merges(path: str) -> list[tuple[str, str]]:
    """GPT-2's merges in rank order, from its vocab.bpe: '#version' and then N_MERGES lines 'a b'."""
    text = file_io.read_text(path, f"GPT-2 {MERGES_FILE}")
    if not text.startswith("#version"):
        raise _not_gpt2(path, MERGES_FILE, "it must start with '#version'")
    merges = []
    # split("\n"), not splitlines(): the file is only ever "\n"-separated.
    for number, line in enumerate(text.split("\n")[1:], start=2):
        if not line:
            continue
        pair = line.split(" ")
        if len(pair) != 2 or not all(pair):
            raise _not_gpt2(path, MERGES_FILE, f"line {number}: expected two tokens, got {line[:80]!r}")
        merges.append((pair[0], pair[1]))
    if len(merges) != N_MERGES:
        raise _not_gpt2(path, MERGES_FILE, f"it holds {len(merges)} merges, expected {N_MERGES} (cut short?)")
    return merges


def _read_encoder(path: str) -> dict[str, int]:
    """GPT-2's token -> id table, from its encoder.json: ids 0..EOT_ID, each once, EOT last."""
    encoder = file_io.read_json(path, f"GPT-2 {ENCODER_FILE}")
    if not isinstance(encoder, dict) or encoder.get(EOT) != EOT_ID:
        raise _not_gpt2(path, ENCODER_FILE, f"expected a JSON object of token -> id that maps {EOT!r} to {EOT_ID}")
    ids = sorted(i for i in encoder.values() if isinstance(i, int) and not isinstance(i, bool))
    if ids != list(range(EOT_ID + 1)):
        raise _not_gpt2(path, ENCODER_FILE, f"expected {EOT_ID + 1} tokens with the ids 0..{EOT_ID}, each once; "
                                            f"it has {len(encoder)} entries, {len(ids)} of them integer ids")
    return encoder


def _check_vocabulary(encoder: dict, merges: list, byte_encoder: dict, encoder_file: str, merges_file: str) -> None:
    """InputError unless the two files belong together: every byte is a token, every token is
    made of byte characters, and every merge joins two tokens into a token (so encoding can
    never meet a piece it has no id for, nor decoding a character it has no byte for)."""
    bytes_chars = set(byte_encoder.values())
    missing = [c for c in sorted(bytes_chars) if c not in encoder]
    if missing:
        raise _not_gpt2(encoder_file, ENCODER_FILE, f"the byte token(s) {missing[:5]} have no id")
    foreign = set("".join(encoder)) - bytes_chars  # <|endoftext|> is printable ASCII: byte characters too
    if foreign:
        token = next(t for t in encoder if not foreign.isdisjoint(t))
        raise _not_gpt2(encoder_file, ENCODER_FILE, f"token {token[:40]!r} is not made of GPT-2's byte characters")
    if all(a in encoder and b in encoder and a + b in encoder for a, b in merges):
        return
    for number, (a, b) in enumerate(merges, start=1):
        unknown = [t for t in (a, b, a + b) if t not in encoder]
        if unknown:
            raise _not_gpt2(merges_file, MERGES_FILE, f"merge {number} ({a!r} {b!r}) makes or uses "
                                                      f"{unknown[0]!r}, which {encoder_file!r} has no id for")


class BPETokenizer:
    """GPT-2 tokenizer: `encode(text) -> list[int]`, `decode(ids) -> str`.

    Paths left as None are taken from `find_vocab_dir()`. A missing or damaged file raises
    io_utils.InputError naming it and what it should be (OpenAI's GPT-2 vocabulary).
    """

    def __init__(self, encoder_file: str | None = None, vocab_file: str | None = None):
        if encoder_file is None or vocab_file is None:
            folder = find_vocab_dir()
            encoder_file = encoder_file or os.path.join(folder, "encoder.json")
            vocab_file = vocab_file or os.path.join(folder, "vocab.bpe")
        self.encoder = _read_encoder(encoder_file)
        merges = _read_merges(vocab_file)
        self.byte_encoder = bytes_to_unicode()
        _check_vocabulary(self.encoder, merges, self.byte_encoder, encoder_file, vocab_file)
        # A lower rank merges first; keyed by pair so each lookup is one dict probe.
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.id_to_bytes = {i: bytes(byte_decoder[c] for c in token)
                            for token, i in self.encoder.items()}
        self.eot_id = EOT_ID
        self.vocab_size = len(self.encoder)
        # Pre-token -> ids. Captions reuse a few thousand words, so after the
        # first pass encoding is almost only regex matching and dict lookups.
        self.cache: dict[str, list[int]] = {}

    def _bpe(self, word: str) -> list[int]:
        """Ids of one pre-token (already mapped through the byte table)."""
        ids = self.cache.get(word)
        if ids is not None:
            return ids
        parts = list(word)
        while len(parts) > 1:
            # Merge the lowest-ranked adjacent pair, everywhere it occurs.
            pairs = set(zip(parts, parts[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self.encoder[p] for p in parts]
        self.cache[word] = ids
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        ids = []
        for piece in PATTERN.findall(text):
            ids.extend(self._bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8"))))
        return ids

    def encode(self, text: str, allowed_special=None) -> list[int]:
        """Token ids of `text`.

        `<|endoftext|>` in the text becomes id `eot_id` only if it is listed in
        `allowed_special` (a set of strings, or "all"); otherwise it raises,
        so text from a file can never inject a control token by accident.
        """
        if allowed_special == "all":
            allowed_special = {EOT}
        allowed = set(allowed_special or ())
        if allowed - {EOT}:
            raise ValueError(f"unknown special tokens {sorted(allowed - {EOT})}; "
                             f"the only special token is {EOT!r}")
        if EOT not in allowed:
            if EOT in text:
                raise ValueError(f"text contains the special token {EOT!r}; pass "
                                 f"allowed_special={{{EOT!r}}} to encode it as id {self.eot_id}")
            return self._encode_ordinary(text)
        chunks = text.split(EOT)
        ids = self._encode_ordinary(chunks[0])
        for chunk in chunks[1:]:
            ids.append(self.eot_id)
            ids.extend(self._encode_ordinary(chunk))
        return ids

    def decode(self, ids) -> str:
        """Text of `ids` (any iterable of ints, e.g. a list or 1-D tensor).

        A token may hold part of a UTF-8 character, so a cut-off sequence
        decodes with U+FFFD in its place rather than raising.
        """
        try:
            data = b"".join(self.id_to_bytes[int(i)] for i in ids)
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is outside 0..{self.vocab_size - 1}") from None
        return data.decode("utf-8", errors="replace")
