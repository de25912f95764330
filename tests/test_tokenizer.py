"""tokenizer.BPETokenizer against the two reference GPT-2 tokenizers.

transformers' GPT2Tokenizer is built from the same local files; tiktoken's
"gpt2" encoding is built by tiktoken's own loader from the same files, which
it checks against the SHA-256 of OpenAI's originals (its usual path downloads
them, which the test machines cannot).
"""
import hashlib
import inspect
import os
import random
import time

import pytest

import io_utils
import tokenizer
from tokenizer import EOT, BPETokenizer, find_vocab_dir

CORPUS = [
    "",
    "a man riding a bike.",
    "A group of people standing around a table with food.",
    "Two dogs play in the snow",
    " A man in a red shirt is climbing a rock .",
    " Children are playing on the beach , near the water .",
    "café au lait, naïve résumé, Ångström, São Paulo",
    "í ñ ü ß ø œ",
    "soft\u00adhyphen and \u00ad alone",
    "emoji 🚲🐶👍🏽 and a flag 🇹🇼",
    "中文字幕 日本語のテキスト 한국어",
    "1234567 people, 3.14, 2023-10-01, 1,000,000 and 12:30pm",
    "What?!... Wow!!! (yes) [no] {maybe} --- ***",
    "it's they'll we've I'm you'd she's can't",
    "IT'S I'M THEY'LL WE'VE",
    "multiple   spaces    here",
    "tabs\tand\ttab\t\tdouble",
    "new\nline\n\nand\r\nwindows",
    "trailing spaces   ",
    "   leading spaces",
    " \n \t ",
    "mixed\u3000ideographic space and \u00a0nbsp",
    "control \x00\x01\x7f\x85 bytes",
]


@pytest.fixture(scope="module")
def bpe(bpe_dir):
    return BPETokenizer(os.path.join(bpe_dir, "encoder.json"), os.path.join(bpe_dir, "vocab.bpe"))


@pytest.fixture(scope="module")
def hf(bpe_dir):
    transformers = pytest.importorskip("transformers")
    files = (os.path.join(bpe_dir, "encoder.json"), os.path.join(bpe_dir, "vocab.bpe"))
    params = inspect.signature(transformers.GPT2Tokenizer.__init__).parameters
    # transformers 4 names the files vocab_file/merges_file; 5 names them
    # vocab/merges and silently ignores the old names (an empty tokenizer).
    names = ("vocab_file", "merges_file") if "vocab_file" in params else ("vocab", "merges")
    hf = transformers.GPT2Tokenizer(**dict(zip(names, files)))
    assert len(hf) == 50257, f"transformers {transformers.__version__} did not load the files"
    return hf


@pytest.fixture(scope="module")
def tik(bpe_dir, tmp_path_factory):
    tiktoken = pytest.importorskip("tiktoken")
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:  # noqa: BLE001 - offline the download fails: build it from the local files
        return _local_tiktoken(tiktoken, bpe_dir, str(tmp_path_factory.mktemp("tiktoken_cache")))


def _local_tiktoken(tiktoken, bpe_dir, cache_dir):
    """tiktoken's own "gpt2" constructor (its pattern, its pinned hashes of OpenAI's files), its loader
    pointed at the local files instead of OpenAI's addresses. Taking the pattern from the constructor
    works on every tiktoken: 0.7 (the last for Python 3.8) writes it inline, later ones name it. The
    files are read into a fresh cache, so their hashes are checked (a cache entry from another run,
    keyed by path, is never taken), and read with open(): tiktoken 0.7 reads a local path through
    blobfile, which it does not install."""
    try:
        import tiktoken.load as load
        import tiktoken_ext.openai_public as public
        real_ranks, real_read = public.data_gym_to_mergeable_bpe_ranks, load.read_file
    except (ImportError, AttributeError) as e:
        pytest.skip(f"tiktoken cannot download 'gpt2' offline and lacks its loader: {e}")

    def from_local_files(vocab_bpe_file, encoder_json_file, **hashes):
        return real_ranks(os.path.join(bpe_dir, os.path.basename(vocab_bpe_file)),
                          os.path.join(bpe_dir, os.path.basename(encoder_json_file)), **hashes)

    def read_file(blobpath):
        if "://" in blobpath:
            return real_read(blobpath)
        with open(blobpath, "rb") as f:
            return f.read()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(public, "data_gym_to_mergeable_bpe_ranks", from_local_files)
        patch.setattr(load, "read_file", read_file)
        patch.setenv("TIKTOKEN_CACHE_DIR", cache_dir)
        spec = public.gpt2()
    assert os.listdir(cache_dir), "tiktoken's loader did not read the files through its checked cache"
    return tiktoken.Encoding(**dict(spec, name="gpt2-local"))


def test_course_examples(bpe):
    assert bpe.encode("a man riding a bike.") == [64, 582, 10311, 257, 7161, 13]
    assert bpe.encode(" .") == [764]
    assert bpe.encode(".") == [13]
    assert bpe.eot_id == 50256
    assert bpe.vocab_size == 50257


@pytest.mark.parametrize("text", CORPUS)
def test_matches_transformers(bpe, hf, text):
    assert bpe.encode(text) == hf.encode(text)


@pytest.mark.parametrize("text", CORPUS)
def test_matches_tiktoken(bpe, tik, text):
    assert bpe.encode(text) == tik.encode_ordinary(text)


@pytest.mark.parametrize("text", CORPUS)
def test_roundtrip(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_soft_hyphen_and_i_acute_encode(bpe):
    # Both broke the course's byte table (0xAD is a UTF-8 byte of "í" too).
    for text in ("í", "\u00ad"):
        ids = bpe.encode(text)
        assert ids and bpe.decode(ids) == text


def test_every_id_decodes(bpe, hf):
    texts = [bpe.decode([i]) for i in range(bpe.vocab_size)]
    assert len(texts) == 50257 and all(isinstance(t, str) for t in texts)
    sample = random.Random(0).sample(range(bpe.vocab_size), 2000) + list(range(256)) + [50256]
    for i in sample:
        assert texts[i] == hf.convert_tokens_to_string([hf.convert_ids_to_tokens(i)]), i


def test_partial_utf8_decodes_with_replacement(bpe):
    ids = bpe.encode("🚲")
    assert len(ids) > 1  # the emoji's 4 bytes span several tokens
    # A cut-off UTF-8 sequence becomes a single U+FFFD.
    assert bpe.decode(ids[:1]) == "\ufffd"
    assert bpe.decode(ids[:1] + bpe.encode(" ok")) == "\ufffd ok"


def test_decode_rejects_unknown_id(bpe):
    with pytest.raises(ValueError, match="50257"):
        bpe.decode([50257])


def test_endoftext_requires_allowed_special(bpe, tik):
    text = "a dog.<|endoftext|>A cat."
    with pytest.raises(ValueError, match=r"<\|endoftext\|>"):
        bpe.encode(text)
    with pytest.raises(ValueError, match=r"<\|endoftext\|>"):
        bpe.encode("<|endoftext|>")
    ids = bpe.encode(text, allowed_special={EOT})
    assert ids == bpe.encode("a dog.") + [50256] + bpe.encode("A cat.")
    assert ids == tik.encode(text, allowed_special={EOT})
    assert bpe.encode(text, allowed_special="all") == ids
    assert bpe.encode(EOT, allowed_special={EOT}) == [50256]
    assert bpe.decode(ids) == text


def test_unknown_allowed_special_rejected(bpe):
    with pytest.raises(ValueError, match="<\\|startoftext\\|>"):
        bpe.encode("hi", allowed_special={"<|startoftext|>"})


# OpenAI's GPT-2 124M files (MIT licence), committed at the repository root as in the course's template
VOCAB_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


def test_committed_vocabulary_is_openais(monkeypatch):
    for name, digest in VOCAB_SHA256.items():
        with open(os.path.join(tokenizer.REPO_ROOT, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, name
    monkeypatch.delenv("HW3_BPE_DIR", raising=False)
    assert find_vocab_dir() == tokenizer.REPO_ROOT  # the clone's own copy is the default


def test_default_location_from_env(bpe_dir, monkeypatch):
    monkeypatch.setenv("HW3_BPE_DIR", bpe_dir)
    assert find_vocab_dir() == bpe_dir
    assert BPETokenizer().encode(" .") == [764]


def test_missing_vocabulary_lists_folders(tmp_path, monkeypatch):
    env_dir, repo_dir = tmp_path / "env", tmp_path / "repo"
    for d in (env_dir, repo_dir):
        d.mkdir()
    (env_dir / "encoder.json").write_text("{}")  # only one of the two files: not enough
    monkeypatch.setenv("HW3_BPE_DIR", str(env_dir))
    monkeypatch.setattr(tokenizer, "REPO_ROOT", str(repo_dir))
    with pytest.raises(io_utils.InputError) as info:
        BPETokenizer()
    message = str(info.value)
    for folder in (env_dir, repo_dir):
        assert str(folder) in message
    assert "hw3_download.sh" not in message and "git checkout -- encoder.json vocab.bpe" in message
    assert "OpenAI's GPT-2 vocabulary" in message and "\n" not in message


def test_malformed_vocab_bpe(bpe_dir, tmp_path):
    bad = tmp_path / "vocab.bpe"
    bad.write_text("Ġ t\nh e\n")
    with pytest.raises(ValueError, match="#version"):
        BPETokenizer(os.path.join(bpe_dir, "encoder.json"), str(bad))
    bad.write_text("#version: 0.2\nĠ t\nh e x\n")
    with pytest.raises(ValueError, match="line 3"):
        BPETokenizer(os.path.join(bpe_dir, "encoder.json"), str(bad))


def test_malformed_encoder_json(bpe_dir, tmp_path):
    bad = tmp_path / "encoder.json"
    vocab = os.path.join(bpe_dir, "vocab.bpe")
    bad.write_text('["not", "an", "object"]')
    with pytest.raises(ValueError, match="JSON object"):
        BPETokenizer(str(bad), vocab)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="encoder.json"):
        BPETokenizer(str(bad), vocab)
    bad.write_text('{"a": 0}')
    with pytest.raises(ValueError, match=r"<\|endoftext\|>"):
        BPETokenizer(str(bad), vocab)
    bad.write_text('{"a": 0, "<|endoftext|>": 1}')  # the models take the id from EOT_ID, not the file
    with pytest.raises(ValueError, match=r"maps '<\|endoftext\|>' to 50256"):
        BPETokenizer(str(bad), vocab)


def _damaged(good: bytes, how: str) -> bytes:
    """`good` (a vocabulary file's bytes) damaged as downloads and edits damage files."""
    if how == "empty":
        return b""
    if how == "cut in half":
        return good[:len(good) // 2]
    if how == "cut at a line":
        return good[:good.rindex(b"\n", 0, len(good) // 2) + 1]
    if how == "html page":
        return b"<!DOCTYPE html><html><body>Google Drive - virus scan warning</body></html>"
    if how == "binary":
        return bytes(range(256)) * 4
    if how == "nested":
        return b"[" * 100000
    if how == "lone surrogate":
        return b'{"\\ud800": 0, "<|endoftext|>": 50256}'
    if how == "a token lost":
        return good.replace(b'"the": 1169, ', b"")
    if how == "an id changed":
        return good.replace(b'"the": 1169', b'"the": 1168')
    if how == "an id as text":
        return good.replace(b'"the": 1169', b'"the": "1169"')
    if how == "a merge changed":
        return good.replace("\nĠ t\n".encode(), "\nĠ tzqxj\n".encode(), 1)
    if how == "a line changed":
        return good.replace("\nĠ t\n".encode(), "\nĠt\n".encode(), 1)
    raise AssertionError(how)


ENCODER_DAMAGE = ["empty", "cut in half", "html page", "binary", "nested", "lone surrogate", "a token lost",
                  "an id changed", "an id as text"]
MERGES_DAMAGE = ["empty", "cut in half", "cut at a line", "html page", "binary", "a merge changed", "a line changed"]


@pytest.mark.parametrize("name, how", [("encoder.json", h) for h in ENCODER_DAMAGE]
                         + [("vocab.bpe", h) for h in MERGES_DAMAGE] + [("encoder.json", "folder"),
                                                                        ("vocab.bpe", "folder")])
def test_a_damaged_vocabulary_file_is_one_input_error_naming_it(bpe_dir, tmp_path, monkeypatch, name, how):
    """Any damage to either file (a cut download, a saved web page, an edit) is an InputError naming the
    file and what it should be, at construction: never a KeyError at the first caption."""
    for other in ("encoder.json", "vocab.bpe"):
        if other != name:
            os.symlink(os.path.join(os.path.abspath(bpe_dir), other), tmp_path / other)
    if how == "folder":
        (tmp_path / name).mkdir()
    else:
        with open(os.path.join(bpe_dir, name), "rb") as f:
            (tmp_path / name).write_bytes(_damaged(f.read(), how))
    with pytest.raises(io_utils.InputError) as info:
        BPETokenizer(str(tmp_path / "encoder.json"), str(tmp_path / "vocab.bpe"))
    message = str(info.value)
    assert str(tmp_path / name) in message and "\n" not in message, message
    if how not in ("folder", "binary", "nested", "lone surrogate"):  # those are named as file_io reads any file
        assert f"is not OpenAI's GPT-2 {name}" in message or f"GPT-2 {name} " in message, message


def test_the_default_vocabulary_damaged_names_the_fix(bpe_dir, tmp_path, monkeypatch):
    """HW3_BPE_DIR pointing at a damaged copy: the error says how to get the real one back."""
    (tmp_path / "encoder.json").write_text('{"a": 0}', encoding="utf-8")
    os.symlink(os.path.join(os.path.abspath(bpe_dir), "vocab.bpe"), tmp_path / "vocab.bpe")
    monkeypatch.setenv("HW3_BPE_DIR", str(tmp_path))
    with pytest.raises(io_utils.InputError, match="git checkout -- encoder.json vocab.bpe"):
        BPETokenizer()


def test_the_special_token_is_defined_once():
    """Only tokenizer.py spells out <|endoftext|> or its id; every other module imports them."""
    import ast
    import glob

    import tokenizer

    assert (tokenizer.EOT, tokenizer.EOT_ID) == ("<|endoftext|>", 50256)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in glob.glob(os.path.join(repo, "*.py")):
        if os.path.basename(path) == "tokenizer.py":
            continue
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        spelled = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Constant)
                   and node.value in (50256, "<|endoftext|>")]
        assert not spelled, f"{os.path.basename(path)} lines {spelled}: import EOT / EOT_ID from tokenizer"


def test_encoding_speed_report(bpe_dir, hf):
    """Prints (never asserts) the time for a training set's worth of captions."""
    rng = random.Random(0)
    words = [hf.convert_tokens_to_string([t]).strip() for t in
             hf.convert_ids_to_tokens(rng.sample(range(256, 20000), 4000))]
    words = [w for w in words if w.isalpha()]
    captions = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(53000)]
    fresh = BPETokenizer(os.path.join(bpe_dir, "encoder.json"), os.path.join(bpe_dir, "vocab.bpe"))
    start = time.perf_counter()
    ids = [fresh.encode(c) for c in captions]
    elapsed = time.perf_counter() - start
    print(f"\nencoded {len(captions)} captions of 12 words in {elapsed:.2f} s (cold cache)")
    assert all(ids) and fresh.decode(ids[0]) == captions[0]
