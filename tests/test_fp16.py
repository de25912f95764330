"""The fp16 path, exercised on the CPU (issue 13).

On CUDA the graders' runs and training compute in fp16 (autocast for Problem 2,
OpenAI's fp16 weights for Problem 1); no GPU is needed to catch the dtype
plumbing that path depends on. Each test runs a piece of the real code under
`torch.autocast("cpu", dtype=torch.float16)` (or with fp16 weights, as
`clip.load` gives them on CUDA) and compares it with the same code in fp32.
CPU autocast casts more ops to fp16 than CUDA's (softmax and LayerNorm too),
so it is the stricter of the two.

Tolerances, stated once (the fp16 mantissa has 11 bits, about 5e-4 relative):
- logits: max |fp16 - fp32| <= LOGIT_ATOL + LOGIT_RTOL * max |fp32|;
- probabilities / attention weights: max |fp16 - fp32| <= PROB_ATOL;
- losses and gradient norms: relative difference <= LOSS_RTOL;
- embeddings: cosine similarity with fp32 >= EMBED_COS;
- captions: equal, or else, where fp16 chose another caption, the two are a near
  tie in fp32 (score gap <= TIE_NATS) -- a choice between near equals may
  legitimately flip in fp16; at most a third of the captions may differ (on torch 2.14, 2 of 12
  greedy and 1 of 12 beam-3 captions of the adapter model did, each a near tie; none of the prefix model's).

The -inf masks, the beam-search scores and the log-softmax are also tested
directly on fp16 tensors with values at fp16's limits.
"""
import copy
import glob
import math
import os

import numpy as np
import pytest
import torch
from conftest import TINY_VIT, TINY_VIT_KWARGS

import p2_train
from captioner import Captioner, make_config, mark_trainable
from decoder import Decoder, DecoderConfig, KVCache, SelfAttention, sample_next
from tokenizer import EOT_ID

LOGIT_ATOL, LOGIT_RTOL = 0.02, 0.01
PROB_ATOL = 0.01
LOSS_RTOL = 0.01
EMBED_COS = 0.999
TIE_NATS = 0.05
MAX_SKIPPED = 8  # GradScaler steps skipped before it settles: its scale falls from 2**16 to at least 2**8

PRESETS = {  # tiny versions of each PEFT preset
    "none": {},
    "adapter": dict(adapter_dim=16),
    "prefix": dict(prefix_len=4, prefix_hidden=32),
    "lora": dict(lora_rank=4, lora_alpha=8.0),
}


def fp16_autocast():
    return torch.autocast("cpu", dtype=torch.float16)


@pytest.fixture(scope="module", autouse=True)
def cpu_fp16_autocast_works():
    """Skip the module where this torch refuses CPU autocast in fp16 (torch < 2.1 or so)."""
    try:
        with fp16_autocast():
            y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    except (RuntimeError, TypeError, ValueError) as error:  # old torch: "only bfloat16 is supported"
        pytest.skip(f"this torch ({torch.__version__}) has no CPU autocast in float16: {error}")
    if y.dtype != torch.float16:
        pytest.skip(f"this torch ({torch.__version__}) ignores dtype=float16 in CPU autocast")


def assert_close_logits(fp16: torch.Tensor, fp32: torch.Tensor, what: str):
    assert torch.isfinite(fp16).all(), f"{what}: non-finite values in fp16"
    err = (fp16.float() - fp32).abs().max().item()
    bound = LOGIT_ATOL + LOGIT_RTOL * fp32.abs().max().item()
    assert err <= bound, f"{what}: max |fp16 - fp32| = {err:.4g} > {bound:.4g}"


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-8)


# -- the captioner ----------------------------------------------------------------------------


def make_model(peft: str, setup: dict, seed: int = 0) -> Captioner:
    """A tiny captioner: the caption-language GPT-2 of the test setup, the tiny ViT, and new modules
    drawn at random (a fresh model's cross-attention adds exactly nothing, which would test nothing)."""
    config = make_config(peft, encoder=TINY_VIT, encoder_kwargs=TINY_VIT_KWARGS, **PRESETS[peft])
    model = Captioner(config, setup["decoder_weights"], encoder_weights=setup["encoder_weights"])
    mark_trainable(model, verbose=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("ln.weight") else 0.05 * torch.randn_like(p))
    return model.eval()


def val_images(setup: dict, model: Captioner, n: int) -> torch.Tensor:
    """The first n validation images of the synthetic set, preprocessed: [n, 3, 32, 32]."""
    from image_io import open_rgb

    paths = sorted(glob.glob(os.path.join(setup["data_root"], "images", "val", "*")))[:n]
    return torch.stack([model.encoder.transform(open_rgb(p)) for p in paths])


@pytest.fixture(scope="module")
def models(captioning_setup):
    return {peft: make_model(peft, captioning_setup) for peft in PRESETS}


@pytest.fixture(scope="module")
def images(captioning_setup, models):
    return val_images(captioning_setup, models["none"], 12)


@pytest.mark.parametrize("peft", sorted(PRESETS))
def test_forward_under_fp16_autocast_matches_fp32(models, images, peft):
    model = models[peft]
    idx = torch.tensor([[EOT_ID, 64, 3797, 318, 257, 2266]] * len(images))  # "a cat is a ..." as ids
    with torch.no_grad():
        feats32 = model.encode(images)
        logits32 = model(feats32, idx)
        with fp16_autocast():
            feats16 = model.encode(images)
            logits16 = model(feats16, idx)
    assert logits16.dtype == torch.float16  # the ViT's last LayerNorm may hand back fp32 tokens (autocast's rule)
    assert_close_logits(feats16, feats32, f"{peft}: image tokens")
    assert_close_logits(logits16, logits32, f"{peft}: logits")
    p16, p32 = logits16.float().softmax(-1), logits32.softmax(-1)
    assert (p16 - p32).abs().max() <= PROB_ATOL


def caption_logp(model: Captioner, feats: torch.Tensor, ids: list, max_len: int) -> float:
    """fp32 log-probability of one caption (and of its <|endoftext|>, unless cut at max_len)."""
    target = ids + ([EOT_ID] if len(ids) < max_len else [])
    inp = torch.tensor([[EOT_ID, *target[:-1]]])
    logp = model(feats, inp)[0].log_softmax(-1)  # [T, V]
    return float(logp[torch.arange(len(target)), torch.tensor(target)].sum())


def first_step_gap(model: Captioner, feats: torch.Tensor, a: list, b: list) -> float:
    """fp32 log-probability gap between the two tokens where greedy captions a and b first part."""
    k = next(i for i in range(min(len(a), len(b)) + 1) if i == len(a) or i == len(b) or a[i] != b[i])
    logp = model(feats, torch.tensor([[EOT_ID, *a[:k]]]))[0, -1].log_softmax(-1)
    ta = a[k] if k < len(a) else EOT_ID
    tb = b[k] if k < len(b) else EOT_ID
    return abs(float(logp[ta] - logp[tb]))


@pytest.mark.parametrize("beam", [1, 3])
@pytest.mark.parametrize("peft", ["adapter", "prefix"])
def test_generate_under_fp16_autocast_gives_the_fp32_captions(models, images, peft, beam):
    """Beam 1 (greedy) and beam 3: the same captions, or near ties in fp32 where they part."""
    model, max_len = models[peft], 16
    with torch.no_grad():
        feats32 = model.encode(images)
        ids32 = model.generate(feats32, beam_size=beam, max_len=max_len)
        with fp16_autocast():
            ids16 = model.generate(model.encode(images), beam_size=beam, max_len=max_len)
        assert all(len(c) > 0 for c in ids16), ids16
        differ = [i for i, (a, b) in enumerate(zip(ids16, ids32)) if a != b]
        for i in differ:
            f = feats32[i:i + 1]
            if beam == 1:
                gap = first_step_gap(model, f, ids16[i], ids32[i])
            else:
                gap = caption_logp(model, f, ids32[i], max_len) - caption_logp(model, f, ids16[i], max_len)
            assert gap <= TIE_NATS, f"image {i}: fp16 {ids16[i]} vs fp32 {ids32[i]}, fp32 gap {gap:.3f} nats"
    assert len(differ) <= len(images) // 3, f"{len(differ)} of {len(images)} captions differ in fp16"


# -- training steps ---------------------------------------------------------------------------


def learner_for(model: Captioner, cached: bool, scaler: bool, *options: str) -> p2_train.Learner:
    """p2_train's Learner at its defaults (but `options`) around a copy of `model`, on the CPU. With
    `scaler`, a CPU GradScaler replaces the (CUDA-only, so disabled) one: the scale/unscale/step path of CUDA."""
    args = p2_train.parse_args(["--print-params", *options])
    args.device, args.cache_features = "cpu", "(test features)" if cached else None
    args.scst_batch_size, args.scst_samples, args.max_len = 4, 3, 12
    model = copy.deepcopy(model)
    model.config["generation"]["max_len"] = args.max_len
    learner = p2_train.Learner(model.train(), torch.device("cpu"), args)
    learner.use_optimizer(args.lr, args.weight_decay)
    if scaler:
        if not hasattr(torch.amp, "GradScaler"):
            pytest.skip(f"torch {torch.__version__} has no device-generic torch.amp.GradScaler")
        learner.scaler = torch.amp.GradScaler("cpu")
    return learner


def caption_batch(n: int, seed: int = 0):
    from p2_data import make_batch

    rng = np.random.default_rng(seed)
    vocab = [64, 3797, 318, 257, 2266, 319, 262, 3084, 1310, 13]  # everyday GPT-2 tokens
    return make_batch([rng.choice(vocab, int(k)).tolist() for k in rng.integers(3, 14, n)])


def trainable_delta(learner: p2_train.Learner, before: list) -> torch.Tensor:
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(learner.params, before)])


def scaled_step(learner: p2_train.Learner, step) -> tuple:
    """step() under fp16 autocast until GradScaler takes it: (its result, steps skipped before).

    GradScaler starts at 2**16 and halves its scale at every step whose gradients hold inf or NaN,
    skipping the update (the parameters stay as they were, so the same batch is simply retried);
    a few skipped steps at the start of a run are its normal calibration."""
    for skipped in range(MAX_SKIPPED + 1):
        scale = learner.scaler.get_scale()
        with fp16_autocast():
            out = step()
        if learner.scaler.get_scale() >= scale:
            return out, skipped
    raise AssertionError(f"GradScaler skipped {MAX_SKIPPED + 1} steps in a row (scale now "
                         f"{learner.scaler.get_scale()}): the fp16 gradients overflow at every scale")


@pytest.mark.parametrize("peft, cached", [(p, True) for p in sorted(PRESETS)] + [("adapter", False)],
                         ids=[f"{p}-feature-cache" for p in sorted(PRESETS)] + ["adapter-images"])
def test_xe_step_under_fp16_autocast_with_grad_scaler(models, images, peft, cached):
    """Learner.xe_step: the same loss as fp32; once GradScaler has found its scale (at most
    MAX_SKIPPED skipped steps), the same gradient norm and an update pointing the same way."""
    x = images[:4]
    if cached:
        with torch.no_grad():
            x = models[peft].encode(x).half()  # what --cache-features stores
    inp, tgt = caption_batch(len(x))
    lr = 1e-3

    ref = learner_for(models[peft], cached, scaler=False)
    before = [p.detach().clone() for p in ref.params]
    out32 = ref.xe_step(x, inp, tgt, lr=lr)
    delta32 = trainable_delta(ref, before)

    amp = learner_for(models[peft], cached, scaler=True)
    out16, skipped = scaled_step(amp, lambda: amp.xe_step(x, inp, tgt, lr=lr))
    delta16 = trainable_delta(amp, before)
    assert math.isfinite(out16["loss"]) and math.isfinite(out16["grad_norm"]), out16
    print(f"{peft}, cache {cached}: GradScaler skipped {skipped} step(s); {out16} vs fp32 {out32}")
    assert relative(out16["loss"], out32["loss"]) <= LOSS_RTOL, (out16, out32)
    assert relative(out16["grad_norm"], out32["grad_norm"]) <= LOSS_RTOL, (out16, out32, skipped)
    assert torch.isfinite(delta16).all() and delta16.abs().max() > 0
    assert torch.nn.functional.cosine_similarity(delta16, delta32, dim=0) >= 0.99


@pytest.mark.parametrize("peft, candidates", [("lora", "beam"), ("lora", "sample")])
def test_scst_step_under_fp16_autocast_with_grad_scaler(models, images, peft, candidates):
    """Learner.scst_step: beam search or sampling, rewards and the policy-gradient step in fp16. Samples
    are drawn from the same seed; where the captions are the same as fp32's, so are the loss and the
    gradient norm."""
    from cider import CiderD, tokenize

    keys = [str(i) for i in range(4)]
    refs = {k: [tokenize(c) for c in ("a red circle on a blue square", "a circle above a square")] for k in keys}
    x = images[:4]

    def stepper(learner):
        """learner.scst_step from the same seeds at every call; the captions it made go in drawn[0]."""
        method = "beam_candidates" if candidates == "beam" else "sample"
        drawn, make = [], getattr(learner.model.decoder, method)

        def recording(*args, **kwargs):
            drawn[:] = [make(*args, **kwargs)]
            return drawn[0]

        setattr(learner.model.decoder, method, recording)

        def step():
            torch.manual_seed(0)
            learner.sampling.manual_seed(1)
            return learner.scst_step(x, keys, CiderD(refs), lr=1e-5)
        return step, drawn

    options = ("--scst-candidates", candidates)
    step32, drawn32 = stepper(learner_for(models[peft], False, False, *options))
    out32 = step32()
    amp = learner_for(models[peft], False, True, *options)
    step16, drawn16 = stepper(amp)
    out16, skipped = scaled_step(amp, step16)
    for key in ("loss", "reward", "baseline", "sample_logp", "grad_norm"):
        assert math.isfinite(out16[key]), (key, out16)
    samples16, samples32 = drawn16[0], drawn32[0]
    assert all(0 < len(s) <= 12 for s in samples16), samples16
    same = sum(a == b for a, b in zip(samples16, samples32))
    assert same >= len(samples32) * 3 // 4, f"only {same} of {len(samples32)} samples as in fp32"
    if same == len(samples32):
        assert abs(out16["loss"] - out32["loss"]) <= LOSS_RTOL * max(1.0, abs(out32["loss"])), (out16, out32)
        assert relative(out16["grad_norm"], out32["grad_norm"]) <= 2 * LOSS_RTOL, (out16, out32, skipped)


# -- Problem 1 -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_pair(tiny_clip_file):
    """(fp32 model, fp16 model, preprocess): clip.load on the CPU casts to fp32; on CUDA it keeps
    OpenAI's fp16 weights, which `clip.model.convert_weights` reproduces here."""
    import clip.model

    import p1_zeroshot

    model32, preprocess = p1_zeroshot.load_clip(tiny_clip_file, torch.device("cpu"))
    model16 = copy.deepcopy(model32)
    clip.model.convert_weights(model16)
    assert model16.dtype == torch.float16
    return model32, model16.eval(), preprocess


def clip_images(preprocess, n=12, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return torch.stack([preprocess(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
                        for _ in range(n)])


@pytest.mark.parametrize("how", ["fp16-weights", "autocast"])
def test_p1_encoders_in_fp16_match_fp32(clip_pair, how):
    """Problem 1's text and image (flip) embeddings and probabilities: fp16 weights (the CUDA path)
    or CPU autocast over the fp32 model, against fp32."""
    import contextlib

    import p1_zeroshot

    model32, model16, preprocess = clip_pair
    classes = ["apple", "maple_tree", "bicycle", "lawn_mower", "girl", "cloud"]
    templates = p1_zeroshot.TEMPLATES[:4]
    images = clip_images(preprocess)
    cpu = torch.device("cpu")
    model, context = (model16, contextlib.nullcontext()) if how == "fp16-weights" else (model32, fp16_autocast())
    with torch.no_grad():
        text32 = p1_zeroshot.text_embeddings(model32, classes, templates, cpu)
        img32 = p1_zeroshot._encode_with_flip(model32, images)
        with context:
            text16 = p1_zeroshot.text_embeddings(model, classes, templates, cpu)
            img16 = p1_zeroshot._encode_with_flip(model, images)
    for name, a, b in (("text", text16, text32), ("image", img16, img32)):
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), name  # callers get fp32
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        assert cos.min() >= EMBED_COS, f"{name}: cosine with fp32 down to {cos.min():.5f}"
    scale = [p1_zeroshot.logit_scale(model)]
    p16 = p1_zeroshot.ensemble_probs([img16], [text16], scale)
    p32 = p1_zeroshot.ensemble_probs([img32], [text32], [p1_zeroshot.logit_scale(model32)])
    assert torch.isfinite(p16).all() and (p16 - p32).abs().max() <= PROB_ATOL
    top2 = p32.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * PROB_ATOL  # where fp32 is not a near tie, the same class
    assert torch.equal(p16.argmax(1)[clear], p32.argmax(1)[clear])


# -- attention extraction ----------------------------------------------------------------------


def test_attention_maps_under_fp16_autocast_match_fp32(models, captioning_setup):
    """p2_attention.word_maps: the same caption and words, maps within PROB_ATOL, finite, summing to
    at most 1 over the patches (the class token takes the rest)."""
    import p2_attention
    from image_io import open_rgb
    from tokenizer import BPETokenizer

    model, tokenizer = models["adapter"], BPETokenizer()
    path = sorted(glob.glob(os.path.join(captioning_setup["data_root"], "images", "val", "*")))[0]
    image = p2_attention.model_view(open_rgb(path), model.encoder.transform)
    caption32, panels32 = p2_attention.word_maps(model, tokenizer, image, "cpu", beam_size=3)
    with fp16_autocast():
        caption16, panels16 = p2_attention.word_maps(model, tokenizer, image, "cpu", beam_size=3)
    assert caption16 == caption32 and [t for t, _ in panels16] == [t for t, _ in panels32]
    for (title, a16), (_, a32) in zip(panels16[1:], panels32[1:]):
        assert a16.dtype == np.float32 and np.isfinite(a16).all(), title
        assert (a16 >= 0).all() and a16.sum() <= 1 + 1e-3, title
        assert np.abs(a16 - a32).max() <= PROB_ATOL, title


# -- masks, scores and log-softmax on fp16 tensors -------------------------------------------------


def attention_config(**overrides) -> DecoderConfig:
    return DecoderConfig(**{**dict(n_layer=1, n_embd=128, vocab_size=8, n_ctx=64, encoder_width=64), **overrides})


@pytest.mark.parametrize("prefix", [False, True])
def test_causal_mask_and_cache_in_fp16(prefix):
    """SelfAttention with fp16 weights and inputs: the -inf causal mask over a whole sequence and
    step by step through the key/value cache (the decoding case: one query, all keys visible) give
    finite outputs equal to fp32's. Large inputs push the scores far from zero without overflow."""
    torch.manual_seed(0)
    attn32 = SelfAttention(attention_config()).eval()
    attn16 = copy.deepcopy(attn32).half()
    x = 4.0 * torch.randn(3, 10, 128)
    kv = (0.5 * torch.randn(2, 4, 128)) if prefix else None  # [2, P, C]: keys, values
    with torch.no_grad():
        pos = torch.arange(x.size(1))
        y32 = attn32(x, pos, None, kv)
        y16 = attn16(x.half(), pos, None, None if kv is None else kv.half())
        assert_close_logits(y16, y32, "whole sequence")
        cache, steps = KVCache(1, x.size(1) + 2), []
        for t in range(x.size(1)):  # one token at a time through the cache
            steps.append(attn16(x[:, t:t + 1].half(), pos[t:t + 1], (cache, 0), None if kv is None else kv.half()))
        assert cache.layers[0].dtype == torch.float16
        assert_close_logits(torch.cat(steps, 1), y32, "step by step")


def test_fp16_log_softmax_at_the_limits_stays_finite_and_ordered():
    """What beam_search and sample do with fp16 logits: .float() before log_softmax. Logits at fp16's
    limits (+-65504) and -inf masks give finite, ordered log-probabilities; in fp16 arithmetic
    the far tail would fall to -inf (a tie) -- which is why the code converts first."""
    big = torch.finfo(torch.float16).max
    logits = torch.tensor([[big, big - 32, 0.0, -big, float("-inf")]], dtype=torch.float16)
    logp = logits.float().log_softmax(-1)
    assert torch.isfinite(logp[0, :4]).all() and logp[0, 4] == float("-inf")
    assert (logp[0, :4].diff() < 0).all(), logp  # ordered as the logits
    assert (logits.log_softmax(-1)[0, 3] == float("-inf")), "fp16 arithmetic would lose the tail"


class ScriptedLM(Decoder):
    """A stand-in decoder whose fp16 logits are a fixed function of the prefix: exercises
    beam_search's score code alone. The 'cache' carries the prefix tokens, so it is reordered
    with the beams exactly as a real cache is."""

    def __init__(self, table: dict, vocab: int):
        torch.nn.Module.__init__(self)
        self.table, self.vocab = table, vocab
        self.cfg = attention_config(vocab_size=vocab)

    def memory(self, feats):
        return [None]

    def forward(self, idx, memory, cache, start):
        T, end = idx.size(1), int(start) + idx.size(1)
        tokens = idx.float()[:, None, :, None]  # the cache's layout [N, H, T, D] with H = D = 1
        keys, _ = cache.write(0, tokens, tokens, torch.arange(T) + int(start))
        prefixes = keys[:, 0, :end, 0].long()  # [N, t + 1], the start token first
        rows = [self.table.get(tuple(p[1:].tolist()), self.table["default"]) for p in prefixes]
        logits = torch.tensor(rows, dtype=torch.float32).to(torch.float16)  # [N, V]
        return logits[:, None], None


def test_beam_scores_from_fp16_logits_at_the_limits():
    """Logits 65504 apart in fp16: the scores are summed in fp32, stay finite and ordered, and beam
    search finds the caption computed by hand. Dead beams at the first step are whole rows of -inf
    (fully masked), and with a 4-token vocabulary top-2K must pick some: no NaN comes of them."""
    big, eot = 60000.0, 3  # a multiple of 32, fp16's spacing there: big - 64 is exact
    ninf = float("-inf")
    table = {
        (): [big, big - 64, -big, 0.0],  # 0 likeliest, 1 at -64, 2 at -120000; <|endoftext|> masked at t=0
        (0,): [-big, -big, big, -big],  # 0 -> 0 2
        (1,): [-big, -big, -big, big],  # 1 -> ends at -64
        (0, 2): [-big, -big, -big, big],  # 0 2 -> ends at ~0: the best
        "default": [0.0, 0.0, 0.0, 0.0],
    }
    lm = ScriptedLM(table, vocab=4)
    feats = torch.zeros(2, 1, 64)
    for beam in (1, 2, 3):
        assert lm.beam_search(feats, beam, 5, eot) == [[0, 2], [0, 2]], beam
    # every token masked at the first step: the whole first row is -inf -> an empty caption, no NaN
    lm = ScriptedLM({"default": [ninf, ninf, ninf, big]}, vocab=4)
    assert lm.beam_search(feats, 2, 5, eot) == [[], []]


def test_sampling_from_fp16_logits_with_masks():
    """sample_next with fp16 logits (-inf masks, values at fp16's limits, top-k and top-p): never a
    masked token, no NaN, always the only finite token where just one is left."""
    big = torch.finfo(torch.float16).max
    logits = torch.tensor([[0.0, float("-inf"), 1.0, -big, 2.0, float("-inf")],
                           [float("-inf")] * 5 + [big],
                           [big, big, big, big, big, big]], dtype=torch.float16)
    g = torch.Generator().manual_seed(0)
    for top_k, top_p in ((0, 1.0), (3, 1.0), (0, 0.9), (2, 0.5)):
        for _ in range(20):
            tok = sample_next(logits, top_k, top_p, generator=g)
            assert tok[0].item() not in (1, 5) and tok[1].item() == 5, (top_k, top_p, tok)
            assert 0 <= tok[2].item() < 6
