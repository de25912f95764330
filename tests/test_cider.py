"""cider.py against coco-caption (pycocoevalcap), the scorer the course uses."""
import math
import random
import shutil
from collections import Counter

import numpy as np
import pytest

from cider import CiderD, tokenize

pycoco_cider = pytest.importorskip("pycocoevalcap.cider.cider")


def _random_caption(rng, vocab, lo, hi):
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, hi)))


def _synthetic_set(seed=0, images=40):
    """References and candidates over a small vocabulary, so n-grams overlap.

    The candidates cover the corner cases of the arithmetic: empty, one word
    (zero bigrams, like the empty one), a word repeated, very long, and a
    copy of a reference.
    """
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(25)]
    gts = {f"img{i:03d}": [_random_caption(rng, vocab, 1, 14) for _ in range(rng.randint(1, 5))]
           for i in range(images)}
    res = {k: _random_caption(rng, vocab, 2, 16) for k in gts}
    keys = sorted(gts)
    res[keys[0]] = ""
    res[keys[1]] = "w3"
    res[keys[2]] = " ".join(["w1"] * 12)
    res[keys[3]] = _random_caption(rng, vocab, 60, 60)
    res[keys[4]] = gts[keys[4]][0]
    res[keys[5]] = gts[keys[5]][0] + " " + gts[keys[5]][0]
    return gts, res


def test_cider_d_equals_pycocoevalcap_on_a_synthetic_set():
    gts, res = _synthetic_set()
    mean, scores = CiderD().compute_score(gts, res)
    ref_mean, ref_scores = pycoco_cider.Cider().compute_score(gts, {k: [v] for k, v in res.items()})
    ref_by_key = dict(zip(gts.keys(), ref_scores))

    assert mean == pytest.approx(ref_mean, abs=1e-9)
    assert scores.shape == (len(gts),)
    np.testing.assert_allclose(scores, [ref_by_key[k] for k in sorted(gts)], rtol=0, atol=1e-9)
    # the set exercises the metric: the copied reference scores high, the
    # empty candidate 0, and the scores are not all alike
    assert scores[4] > 1.0 and scores[0] == 0.0
    assert len(set(np.round(scores, 6))) > 20


def test_cider_d_accepts_coco_caption_one_element_lists():
    gts, res = _synthetic_set(seed=1, images=10)
    mean, _ = CiderD().compute_score(gts, res)
    mean_lists, _ = CiderD().compute_score(gts, {k: [v] for k, v in res.items()})
    assert mean == mean_lists


def test_a_single_image_scores_zero_with_its_own_document_frequencies():
    gts = {"a": ["a dog runs on the grass", "a brown dog running"]}
    res = {"a": "a dog runs on the grass"}
    mean, scores = CiderD().compute_score(gts, res)
    ref_mean, _ = pycoco_cider.Cider().compute_score(gts, {"a": [res["a"]]})
    assert mean == 0.0 and ref_mean == 0.0 and scores.tolist() == [0.0]


def test_key_mismatch_is_an_error():
    with pytest.raises(ValueError, match="1 missing, 1 extra"):
        CiderD().compute_score({"a": ["x y"], "b": ["y z"]}, {"a": "x y", "c": "y"})


# ---------------------------------------------------------------------------
# document frequencies from an external corpus (self-critical training)
# ---------------------------------------------------------------------------


def _brute_force_cider_d(candidate, references, corpus, n=4, sigma=6.0):
    """CIDEr-D written out plainly (Vedantam et al. 2015 as coded in coco-caption).

    corpus: key -> references, the source of the document frequencies.
    """
    def ngrams(text, k):
        words = text.split()
        return [tuple(words[i:i + k]) for i in range(len(words) - k + 1)]

    df = Counter()
    for refs in corpus.values():
        df.update({g for r in refs for k in range(1, n + 1) for g in ngrams(r, k)})
    log_n = math.log(len(corpus))

    def weights(text, k):
        return {g: tf * (log_n - math.log(max(1.0, df[g]))) for g, tf in Counter(ngrams(text, k)).items()}

    def length(text):  # coco-caption counts bigrams
        return max(len(text.split()) - 1, 0)

    total = 0.0
    for ref in references:
        penalty = math.exp(-((length(candidate) - length(ref)) ** 2) / (2 * sigma ** 2))
        for k in range(1, n + 1):
            c, r = weights(candidate, k), weights(ref, k)
            dot = sum(min(w, r.get(g, 0.0)) * r.get(g, 0.0) for g, w in c.items())
            norm_c = math.sqrt(sum(w * w for w in c.values()))
            norm_r = math.sqrt(sum(w * w for w in r.values()))
            if norm_c and norm_r:
                dot /= norm_c * norm_r
            total += dot * penalty
    return total / n / len(references) * 10.0


def test_cider_d_with_corpus_document_frequencies_equals_the_formula():
    corpus, res = _synthetic_set(seed=2, images=60)
    scorer = CiderD(references=corpus)
    evaluated = sorted(corpus)[:25]
    gts = {k: corpus[k] for k in evaluated}
    mean, scores = scorer.compute_score(gts, {k: res[k] for k in evaluated})

    expected = [_brute_force_cider_d(res[k], corpus[k], corpus) for k in evaluated]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-9)
    assert mean == pytest.approx(np.mean(expected), abs=1e-9)
    assert max(expected) > 0.5  # not a vacuous comparison of zeros


def test_score_candidates_equals_compute_score():
    corpus, _ = _synthetic_set(seed=3, images=50)
    rng = random.Random(4)
    vocab = [f"w{i}" for i in range(25)]
    scorer = CiderD(references=corpus)
    # several samples per key, keys interleaved, as a self-critical batch holds them
    keys = [k for k in sorted(corpus)[:12] for _ in range(4)]
    rng.shuffle(keys)
    candidates = [_random_caption(rng, vocab, 0, 15) for _ in keys]
    candidates[0] = corpus[keys[0]][0]

    fast = scorer.score_candidates(keys, candidates)
    again = scorer.score_candidates(keys, candidates)  # from the reference cache
    one_by_one = [scorer.compute_score({k: corpus[k]}, {k: c})[0] for k, c in zip(keys, candidates)]

    assert fast.shape == (len(keys),)
    np.testing.assert_allclose(fast, one_by_one, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(fast, again)
    assert fast[0] > 1.0


def test_score_candidates_needs_a_corpus_and_known_keys():
    with pytest.raises(ValueError, match="references="):
        CiderD().score_candidates(["a"], ["x"])
    scorer = CiderD(references={"a": ["x y"], "b": ["y z"]})
    with pytest.raises(KeyError, match="'c'"):
        scorer.score_candidates(["c"], ["x"])
    with pytest.raises(ValueError, match="2 keys but 1 candidates"):
        scorer.score_candidates(["a", "b"], ["x"])


# ---------------------------------------------------------------------------
# tokenize() against coco-caption's Java PTB tokenizer
# ---------------------------------------------------------------------------

# Caption-like text: COCO style (capital, final period), Flickr30k style
# (leading space, " ." and pre-split "'s"), generated lower-case text, and
# the punctuation captions carry. All of these tokenise identically.
CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs playing with a frisbee in the grass",
    "A kitchen with stainless steel appliances and granite counter tops.",
    "A black-and-white photo of a man's bicycle.",
    "A woman's hand holding a half-eaten donut.",
    "The cat is sitting on the laptop, looking at the camera.",
    "A street sign that says 'Stop' on a pole.",
    "a 10-year-old boy swinging a baseball bat at a ball",
    "A giraffe standing next to a tree in a zoo enclosure .",
    "People skiing down a snow covered slope; one is falling.",
    "A plate of food: rice, beans, and broccoli.",
    "A man in a suit and tie doesn't look happy.",
    "There's a clock on the tower at 3:30.",
    'A sign that reads "No Parking" next to a street.',
    "A pizza with pepperoni, mushrooms & olives.",
    "Two zebras (one small) grazing in a field.",
    "A train going down the tracks past a building...",
    "A tennis player swings his racket at the ball!",
    "Is this a cat or a dog?",
    "A young girl-in a pink dress-holding an umbrella.",
    "The U.S. flag flying over a building on St. Patrick's Day.",
    "A bathroom with a toilet, sink and shower/tub combo.",
    "An elephant can't fit through the door.",
    "A McDonald's sign near a highway at 5 p.m.",
    "A couple of kids' bikes parked outside.",
    "A living room with a TV -- and a couch.",
    "A bowl of fruit, including apples, oranges, etc.",
    "A 1,000-piece puzzle on a table.",
    "A woman is holding 2.5 pounds of cheese.",
    "Three people in a room; they're playing Wii.",
    " A man in a red shirt is climbing a rock .",
    " A man 's dog is running through the snow .",
    " Two men , one in a gray shirt , one in a black shirt , standing near a stove .",
    " A woman wearing a `` Free Hugs '' sign .",
    " The girl is wearing a t-shirt that says `` I 'm with stupid '' .",
    " A dog jumps over a log - a big one .",
    " Men in uniforms -- possibly soldiers -- march down the street .",
    "A man\u2019s hat and a woman\u2019s \u201cfavorite\u201d scarf\u2026",
    "a man riding a bike down a street next to a car",
    'A sign says: "Don\'t walk!" (in red).',
    "The word \"hello\" in big letters?!",
    "A surfer rides a 6-foot wave at 7 a.m. in the U.K.",
    "We can't see what they're doing; it's dark.",
    "A man cannot stop laughing -- he's gonna fall!",
    "",
]
# Where cider.tokenize still differs from Java: tests/ptb_corpus.py's
# KNOWN_DIFFERENCES, checked against the jar below.


def test_tokenize_known_cases():
    assert tokenize("A man's dog doesn't run.") == "a man 's dog does n't run"
    assert tokenize(" A man riding a bike .") == "a man riding a bike"
    assert tokenize("Two dogs (one black) play \"fetch\"!") == "two dogs -lrb- one black -rrb- play fetch"
    assert tokenize("A black-and-white cat, it's cute...") == "a black-and-white cat it 's cute"
    assert tokenize("can't won't cannot") == "ca n't wo n't can not"
    assert tokenize("the U.S. flag at 3:30 p.m.") == "the u.s. flag at 3:30 p.m."


@pytest.mark.parametrize("caption, expected", [
    ("3\u00bd cups and \u2154 of a pie", "3 1/2 cups and 2/3 of a pie"),  # vulgar fractions: own tokens
    ("3 1/2 cups", "3\u00a01/2 cups"),  # a mixed fraction is one token, its space a no-break space
    ("a long\u00adword, soft\u00ad \u00ad hyphens", "a longword soft hyphens"),
    ("a cafe\u0301 and a nai\u0308ve man", "a cafe\u0301 and a nai\u0308ve man"),  # combining marks stay
    ("a _UNK on a_b", "a _ unk on a_b"),  # "_" is no letter, but joins two words
    ("a <b>bold</b> <a href=\"x\">link</a> a<b", "a <b> bold </b> <a\u00a0href=\"x\"> link </a> a < b"),
    ("\u201cquoted\u201d \u00abtwice\u00bb", "quoted twice"),
    ("a dog \U0001f436 \u2764\ufe0f and \u20b9100", "a dog \u2764 and 100"),  # emoji, selectors, rupee dropped
])
def test_tokenize_follows_java_on_unusual_text(caption, expected):
    """The cases issue 10 found, with the Java tokenizer's output (measured on the jar)."""
    assert tokenize(caption) == expected


def _java_ptb_lines(lines, tmp_path):
    """Java's PTBTokenizer tokens of each line, run as pycocoevalcap runs it (without its
    punctuation removal): the jar coco-caption ships, -preserveLines -lowerCase, a UTF-8 file."""
    import os
    import subprocess

    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = os.path.join(os.path.dirname(ptbtokenizer.__file__), ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    text = tmp_path / "lines.txt"
    text.write_bytes("\n".join(lines).encode("utf-8"))
    out = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer",
                          "-preserveLines", "-lowerCase", str(text)],
                         capture_output=True, check=True, timeout=120).stdout.decode("utf-8")
    rows = out.split("\n")
    assert len(rows) >= len(lines), "the jar returned fewer lines than it was given"
    return [row.split(" ") if row else [] for row in rows[:len(lines)]]


@pytest.mark.skipif(shutil.which("java") is None, reason="the reference tokenizer needs Java")
def test_tokens_equal_the_java_tokenizer_on_a_tricky_corpus(tmp_path):
    """Token for token against the jar itself, on fractions, soft hyphens, combining
    accents, _UNK, tags, quotes, brackets, ellipses, numbers, Unicode punctuation,
    emoji...; the lines that still differ are listed, and must still differ."""
    from ptb_corpus import CORPUS, KNOWN_DIFFERENCES

    from cider import PUNCTUATIONS, _ptb_tokens

    java = _java_ptb_lines(CORPUS, tmp_path)
    differing = {}
    for line, java_tokens in zip(CORPUS, java):
        ours = [t.lower() for t in _ptb_tokens(line)]
        kept = " ".join(t for t in java_tokens if t not in PUNCTUATIONS)
        if line in KNOWN_DIFFERENCES:
            assert " ".join(java_tokens) == KNOWN_DIFFERENCES[line]
            if ours != java_tokens:
                differing[line] = java_tokens
            continue
        assert ours == java_tokens, line
        assert tokenize(line) == kept, line
    assert sorted(differing) == sorted(KNOWN_DIFFERENCES), "a known difference is gone: remove it from the list"


@pytest.mark.skipif(shutil.which("java") is None, reason="the reference tokenizer needs Java")
def test_tokenize_equals_pycocoevalcap_ptb_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    java = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(CAPTIONS)})
    for i, caption in enumerate(CAPTIONS):
        assert tokenize(caption) == java[i][0], caption


@pytest.mark.skipif(shutil.which("java") is None, reason="the reference tokenizer needs Java")
def test_in_process_pipeline_equals_the_course_pipeline():
    """tokenize + CiderD on raw captions == Java PTB tokenizer + pycocoevalcap Cider."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    rng = random.Random(5)
    keys = [f"{i:012d}" for i in range(12)]
    raw_gts = {k: rng.sample(CAPTIONS, rng.randint(2, 5)) for k in keys}
    raw_res = {k: rng.choice(raw_gts[k] + CAPTIONS[:5]) for k in keys}

    tok = PTBTokenizer()
    java_gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in raw_gts.items()})
    java_res = tok.tokenize({k: [{"caption": raw_res[k]}] for k in keys})
    expected, _ = pycoco_cider.Cider().compute_score(java_gts, java_res)

    ours, _ = CiderD().compute_score({k: [tokenize(c) for c in v] for k, v in raw_gts.items()},
                                     {k: tokenize(raw_res[k]) for k in keys})
    assert expected > 0.5
    assert ours == pytest.approx(expected, abs=1e-9)
