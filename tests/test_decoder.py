"""decoder.py against the real thing: transformers' GPT-2 logits, and decoding against plain references."""
import math

import pytest
import torch

from decoder import (
    GPT2_SMALL,
    Decoder,
    DecoderConfig,
    KVCache,
    cuda_graph_unsupported,
    infer_gpt2_shape,
    load_gpt2_into,
    load_gpt2_state,
    parameter_group,
    sample_next,
)
from tokenizer import EOT_ID
PEFT_CASES = {
    "plain": {},
    "adapter": dict(adapter_dim=16),
    "adapter_mlp_only_layer1": dict(adapter_dim=16, adapter_places=["mlp"], adapter_layers=[1]),
    "prefix": dict(prefix_len=4),
    "prefix_reparam": dict(prefix_len=4, prefix_hidden=32),
    "lora": dict(lora_rank=4, lora_alpha=8.0),
    "lora_attn_only": dict(lora_rank=4, lora_alpha=4.0, lora_targets=["attn.c_attn"]),
    "cross_last_only": dict(cross_layers=[1]),
    "all_combined": dict(adapter_dim=8, prefix_len=3, prefix_hidden=16, lora_rank=2, lora_alpha=4.0),
}


def build(tiny_gpt2, **peft):
    path, _ = tiny_gpt2
    state = load_gpt2_state(path)
    decoder = Decoder(DecoderConfig(**infer_gpt2_shape(state), encoder_width=48, **peft))
    load_gpt2_into(decoder, state)
    return decoder.eval()


def perturb_new_parameters(decoder, std=0.05):
    with torch.no_grad():
        for name, param in decoder.named_parameters():
            if parameter_group(name) is not None:
                param.normal_(0.0, std)


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_fresh_model_equals_transformers_gpt2(tiny_gpt2, case):
    """A fresh model (new modules at their initialisation) computes exactly GPT-2's logits."""
    _, reference = tiny_gpt2
    decoder = build(tiny_gpt2, **PEFT_CASES[case])
    torch.manual_seed(1)
    idx = torch.randint(0, EOT_ID + 1, (3, 12))
    feats = torch.randn(3, 7, 48)
    with torch.no_grad():
        ours = decoder(idx, decoder.memory(feats))[0]
        theirs = reference(idx).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # ...and the new modules are wired in: once trained (perturbed) they change the logits
    perturb_new_parameters(decoder)
    with torch.no_grad():
        changed = decoder(idx, decoder.memory(feats))[0]
    assert (changed - theirs).abs().max() > 1e-2


def test_every_new_module_is_reached_by_gradients(tiny_gpt2):
    decoder = build(tiny_gpt2, **PEFT_CASES["all_combined"])
    perturb_new_parameters(decoder)
    idx = torch.randint(0, EOT_ID + 1, (2, 6))
    logits = decoder(idx, decoder.memory(torch.randn(2, 5, 48)))[0]
    logits.square().mean().backward()
    groups = {}
    for name, param in decoder.named_parameters():
        group = parameter_group(name)
        if group is not None:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
            groups[group] = groups.get(group, 0) + 1
    assert set(groups) == {"adapter", "prefix", "lora", "cross_attention", "visual_proj"}


def test_parameter_groups_by_name():
    assert parameter_group("decoder.h.3.attn.c_attn.weight") is None
    assert parameter_group("decoder.wte.weight") is None
    assert parameter_group("encoder.vit.blocks.0.attn.qkv.weight") is None
    assert parameter_group("decoder.h.3.attn.c_attn.lora_A") == "lora"
    assert parameter_group("decoder.prefix.mlp.0.weight") == "prefix"
    assert parameter_group("decoder.prefix.kv") == "prefix"
    assert parameter_group("decoder.h.0.adapter_mlp.up.weight") == "adapter"
    assert parameter_group("decoder.h.0.cross.kv.weight") == "cross_attention"
    assert parameter_group("decoder.visual_proj.bias") == "visual_proj"


def test_shape_is_read_from_the_weights(tiny_gpt2):
    state = load_gpt2_state(tiny_gpt2[0])
    assert infer_gpt2_shape(state) == dict(n_layer=2, n_embd=128, vocab_size=50257, n_ctx=64)
    assert DecoderConfig(**infer_gpt2_shape(state), encoder_width=48).n_head == 2


def test_causal_mask_buffers_are_accepted(tiny_gpt2, tmp_path):
    state = torch.load(tiny_gpt2[0])
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "with_buffers.bin")
    assert set(load_gpt2_state(str(tmp_path / "with_buffers.bin"))) == set(load_gpt2_state(tiny_gpt2[0]))


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop("h.1.mlp.c_fc.bias"), "missing ['h.1.mlp.c_fc.bias']"),
    (lambda s: s.update({"h.0.attn.extra": torch.zeros(1)}), "unexpected ['h.0.attn.extra']"),
    (lambda s: s.update({"h.0.mlp.c_fc.weight": torch.zeros(128, 100)}), "h.0.mlp.c_fc.weight has shape"),
    (lambda s: s.pop("wte.weight"), "no 'wte.weight'"),
    (lambda s: s["h.1.mlp.c_fc.weight"].view(-1)[7].fill_(float("nan")), "['h.1.mlp.c_fc.weight']"),
    (lambda s: s["wpe.weight"].view(-1)[0].fill_(float("inf")), "hold NaN or inf values, e.g. ['wpe.weight']"),
])
def test_bad_decoder_files_fail_clearly(tiny_gpt2, tmp_path, damage, message):
    state = torch.load(tiny_gpt2[0])
    damage(state)
    torch.save(state, tmp_path / "bad.bin")
    with pytest.raises(ValueError) as error:
        load_gpt2_state(str(tmp_path / "bad.bin"))
    assert message in str(error.value)


def test_loading_gpt2_builds_no_decoder(tiny_gpt2, monkeypatch):
    """The expected shapes come from gpt2_shapes, not from a whole random model built to read them."""
    import decoder

    monkeypatch.setattr(decoder, "Decoder", lambda *a, **k: pytest.fail("a Decoder was built"))
    monkeypatch.setattr(decoder.nn, "Linear", lambda *a, **k: pytest.fail("a layer was built"))
    state = load_gpt2_state(tiny_gpt2[0])
    expected = decoder.gpt2_shapes(**decoder.infer_gpt2_shape(state))
    assert {k: tuple(v.shape) for k, v in state.items()} == expected

def test_huggingface_prefixed_layout_is_rejected(tiny_gpt2, tmp_path):
    state = {"transformer." + k: v for k, v in torch.load(tiny_gpt2[0]).items()}
    torch.save(state, tmp_path / "prefixed.bin")
    with pytest.raises(ValueError, match="decoder_model.bin layout"):
        load_gpt2_state(str(tmp_path / "prefixed.bin"))


def test_decoder_files_of_another_kind_say_what_they_hold(tiny_gpt2, tmp_path):
    state = torch.load(tiny_gpt2[0])
    cases = {
        "wrapped.bin": ({"state_dict": state}, "not all tensors ('state_dict': a dict of 28 tensors)"),
        "checkpoint.pt": ({"config": {}, "state_dict": state}, "a captioner checkpoint"),
        "list.bin": ([state["wte.weight"]], "holds a list"),
    }
    for name, (content, message) in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(ValueError) as error:
            load_gpt2_state(str(tmp_path / name))
        assert message in str(error.value) and "expected the course's decoder_model.bin" in str(error.value), name
    (tmp_path / "notes.txt").write_text("decoder weights: see the course page\n", encoding="utf-8")
    with pytest.raises(ValueError, match="notes.txt is not a PyTorch weights file .it is text starting with 'decoder"):
        load_gpt2_state(str(tmp_path / "notes.txt"))


def test_expected_shapes_are_the_decoders_gpt2_parameters(tiny_gpt2, monkeypatch):
    """gpt2_shapes writes GPT-2's layout down; it must be what Decoder builds, and loading builds no Decoder."""
    import decoder

    shape = dict(n_layer=2, n_embd=128, vocab_size=50257, n_ctx=64)
    built = Decoder(DecoderConfig(**shape, encoder_width=48, **PEFT_CASES["all_combined"]))
    frozen = {k: tuple(v.shape) for k, v in built.state_dict().items() if parameter_group(k) is None}
    assert decoder.gpt2_shapes(**shape) == frozen

    def no_decoder(*args, **kwargs):
        raise AssertionError("load_gpt2_state built a decoder")

    monkeypatch.setattr(decoder, "Decoder", no_decoder)
    assert set(load_gpt2_state(tiny_gpt2[0])) == set(frozen)


@pytest.mark.parametrize("case", ["plain", "prefix_reparam", "all_combined"])
def test_key_value_cache_matches_full_forward(tiny_gpt2, case):
    decoder = build(tiny_gpt2, **PEFT_CASES[case])
    perturb_new_parameters(decoder)
    idx = torch.randint(0, EOT_ID + 1, (4, 9))
    with torch.no_grad():
        memory = decoder.memory(torch.randn(4, 5, 48))
        full = decoder(idx, memory)[0]
        cache, pieces = KVCache(decoder.cfg.n_layer, 12), []  # longer than the sequence: 3 positions unused
        for start, stop in [(0, 4), (4, 5), (5, 9)]:
            pieces.append(decoder(idx[:, start:stop], memory, cache, start)[0])
        torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)
        # positions not yet written may hold anything finite (an old beam's keys): attention masks them
        for kv in cache.layers:
            kv.normal_(0.0, 100.0)
        pieces = [decoder(idx[:, start:stop], memory, cache, torch.tensor(start))[0]
                  for start, stop in [(0, 4), (4, 5), (5, 9)]]
        torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)


def test_reordering_the_cache_moves_indices_not_keys():
    """Beams changing parents reorder only the row indices; the keys each sequence then sees are
    its new parent's, at every position written so far, and the stored keys stay where they are
    (a captured CUDA graph reads them there)."""
    torch.manual_seed(0)
    cache = KVCache(1, 4)
    N, H, D = 3, 2, 5
    for t in range(2):
        cache.write(0, torch.randn(N, H, 1, D), torch.randn(N, H, 1, D), torch.tensor([t]))
    stored = cache.layers[0].clone()
    before, _ = cache.write(0, torch.zeros(N, H, 0, D), torch.zeros(N, H, 0, D), torch.tensor([], dtype=torch.long))
    parents = torch.tensor([2, 2, 0])
    cache.reorder(parents)
    assert torch.equal(cache.layers[0], stored)
    after, _ = cache.write(0, torch.zeros(N, H, 0, D), torch.zeros(N, H, 0, D), torch.tensor([], dtype=torch.long))
    assert torch.equal(after[:, :, :2], before[:, parents, :2])  # [H, N, LC, D]: sequence n sees parent n's keys
    new = torch.randn(N, H, 1, D)
    keys, _ = cache.write(0, new, torch.randn(N, H, 1, D), torch.tensor([2]))
    assert torch.equal(keys[:, :, 2], new[:, :, 0].transpose(0, 1))  # its own key at the new position
    assert torch.equal(keys[:, :, :2], before[:, parents, :2])


def uncached_greedy(decoder, feats, max_len, eot):
    """The textbook decoder: one image at a time, the whole prefix recomputed every step."""
    captions = []
    for b in range(feats.size(0)):
        tokens = [eot]
        memory = decoder.memory(feats[b:b + 1])
        for t in range(max_len):
            logp = decoder(torch.tensor([tokens]), memory)[0][0, -1].log_softmax(-1)
            if t == 0:
                logp[eot] = float("-inf")
            nxt = int(logp.argmax())
            if nxt == eot:
                break
            tokens.append(nxt)
        captions.append(tokens[1:])
    return captions


def reference_beam_search(decoder, feat, beam_size, max_len, eot, alpha):
    """Plain, uncached beam search for one image with the rules `Decoder.beam_search` documents."""
    memory = decoder.memory(feat)
    beams, ended = [([], 0.0)], []
    for t in range(max_len):
        candidates = []
        for tokens, score in beams:
            logp = decoder(torch.tensor([[eot] + tokens]), memory)[0][0, -1].float().log_softmax(-1)
            if t == 0:
                logp[eot] = float("-inf")
            candidates += [(score + float(logp[v]), tokens, v) for v in range(logp.numel())]
        candidates.sort(key=lambda c: -c[0])
        beams = []
        for rank, (score, tokens, v) in enumerate(candidates[:2 * beam_size]):
            if v == eot:
                if rank < beam_size:
                    ended.append((score / (t + 1) ** alpha, tokens))
            elif len(beams) < beam_size:
                beams.append((tokens + [v], score))
        best_live = max(score for _, score in beams) / max_len ** alpha
        if len(ended) >= beam_size or (ended and max(s for s, _ in ended) >= best_live):
            break
    else:
        ended += [(score / max_len ** alpha, tokens) for tokens, score in beams]
    return max(ended, key=lambda e: e[0])[1]


def small_vocab_decoder(seed=4, vocab=16):
    """Random decoder with a tiny vocabulary and 16 images' features; with this seed
    captions end at varied lengths, and some run to the length limit."""
    torch.manual_seed(seed)
    decoder = Decoder(DecoderConfig(n_layer=2, n_embd=64, vocab_size=vocab, n_ctx=32, encoder_width=16,
                                    prefix_len=2, adapter_dim=8)).eval()
    with torch.no_grad():
        for name, param in decoder.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 1.0 / math.sqrt(param.shape[-1]))
            elif name == "prefix.kv":
                param.normal_(0.0, 1.0)
    return decoder, torch.randn(16, 5, 16)


def test_cached_greedy_equals_uncached_recomputation(tiny_gpt2):
    decoder = build(tiny_gpt2, **PEFT_CASES["all_combined"])
    perturb_new_parameters(decoder, std=0.2)
    feats = torch.randn(5, 7, 48)
    with torch.no_grad():
        assert decoder.beam_search(feats, 1, 8, EOT_ID) == uncached_greedy(decoder, feats, 8, EOT_ID)
    small, feats = small_vocab_decoder()
    with torch.no_grad():
        captions = small.beam_search(feats, 1, 12, 15)
        assert captions == uncached_greedy(small, feats, 12, 15)
    lengths = {len(c) for c in captions}
    assert min(lengths) < 12 and max(lengths) == 12  # both ended and cut-off captions were exercised


@pytest.mark.parametrize("beam_size, alpha", [(1, 0.0), (1, 1.0), (3, 0.0), (3, 0.7), (4, 1.0)])
def test_batched_beam_search_equals_reference(beam_size, alpha):
    decoder, feats = small_vocab_decoder()
    with torch.no_grad():
        batched = decoder.beam_search(feats, beam_size, 12, 15, alpha)
        reference = [reference_beam_search(decoder, feats[b:b + 1], beam_size, 12, 15, alpha) for b in range(16)]
        greedy = uncached_greedy(decoder, feats, 12, 15)
    assert batched == reference
    if beam_size == 1:
        assert batched == greedy
    lengths = {len(c) for c in batched}
    assert min(lengths) < 12 and 15 not in {t for c in batched for t in c}


def recomputing_beam_search(decoder, feats, beam_size, max_len, eot, alpha):
    """The batched beam search as it was before the preallocated cache (issue 23), with every
    step recomputing all beams' whole prefixes instead of any cache: the same bookkeeping, in
    plain eager code with host-side branches."""
    B, K = feats.size(0), beam_size
    memory = decoder.memory(feats)
    scores = torch.full((B, K), float("-inf"))
    scores[:, 0] = 0.0
    seqs = torch.zeros(B * K, 0, dtype=torch.long)
    rows, rank = torch.arange(B), torch.arange(2 * K)
    ended, done = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.bool)
    best = torch.full((B,), float("-inf"))
    best_seq, best_len = torch.zeros(B, max_len, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    for t in range(max_len):
        prefixes = torch.cat([torch.full((B * K, 1), eot), seqs], dim=1)
        logp = decoder(prefixes, memory)[0][:, -1].float().log_softmax(-1)
        if t == 0:
            logp[:, eot] = float("-inf")
        V = logp.size(-1)
        top, idx = (scores.view(B * K, 1) + logp).view(B, K * V).topk(2 * K, dim=1)
        beam, tok = idx // V, idx % V
        is_eot = tok == eot
        new = is_eot & (rank < K) & ~done.unsqueeze(1)
        normed = torch.where(new, top / float(t + 1) ** alpha, torch.full_like(top, float("-inf")))
        cand_best, arg = normed.max(1)
        better = cand_best > best
        if better.any():
            src = seqs.view(B, K, t)[rows, beam.gather(1, arg.unsqueeze(1)).squeeze(1)]
            best_seq[better, :t] = src[better]
            best_len[better] = t
            best = torch.where(better, cand_best, best)
        ended += new.sum(1)
        order = (is_eot.long() * 2 * K + rank).argsort(dim=1)[:, :K]
        scores = top.gather(1, order)
        parent = (rows.unsqueeze(1) * K + beam.gather(1, order)).view(-1)
        seqs = torch.cat([seqs[parent], tok.gather(1, order).view(-1, 1)], dim=1)
        done |= (ended >= K) | (best >= scores.max(1).values / float(max_len) ** alpha)
        if done.all():
            break
    else:
        live, arg = (scores / float(max_len) ** alpha).max(1)
        better = ~done & (live > best)
        best_seq[better] = seqs.view(B, K, max_len)[rows, arg][better]
        best_len[better] = max_len
    return [best_seq[b, :best_len[b]].tolist() for b in range(B)]


@pytest.mark.parametrize("beam_size, alpha", [(1, 0.0), (3, 0.0), (5, 1.0)])
def test_static_cache_search_equals_the_recomputing_one_at_full_vocabulary(tiny_gpt2, beam_size, alpha):
    """GPT-2's 50257 tokens, every PEFT module, several images: the preallocated cache written in
    place, the reordering of its rows and the branch-free step give the captions of a search that
    recomputes everything (the step the CUDA graph replays is this same code)."""
    torch.manual_seed(1)
    decoder = build(tiny_gpt2, **PEFT_CASES["all_combined"])
    perturb_new_parameters(decoder, std=0.2)
    with torch.no_grad():
        decoder.wte.weight[EOT_ID] *= 14.0  # <|endoftext|> likelier: some captions end, others run to max_len
        feats = torch.randn(6, 7, 48)
        ours = decoder.beam_search(feats, beam_size, 10, EOT_ID, alpha)
        assert ours == recomputing_beam_search(decoder, feats, beam_size, 10, EOT_ID, alpha)
        assert decoder.beam_search(feats, beam_size, 10, EOT_ID, alpha, cuda_graph=True) == ours  # CPU: eager
    assert len({len(c) for c in ours}) > 1, [len(c) for c in ours]


@pytest.mark.parametrize("cuda, hip, words", [
    ("10.2", None, ["built with CUDA 10.2", "CUDA 11.0 or newer"]),  # PyPI's torch 1.12.1
    ("9.2", None, ["built with CUDA 9.2"]),
    (None, None, ["built without CUDA"]),
    (None, "5.2.21151", ["ROCm build"]),
    ("11.0", None, None),
    ("11.3", None, None),
    ("12.4", None, None),
])
def test_cuda_graphs_are_only_tried_where_torch_can_capture_them(monkeypatch, tiny_gpt2, cuda, hip, words):
    """torch 1.x built with CUDA < 11.0 (or for ROCm) raises on building a CUDAGraph: such a build
    gets eager steps on CUDA tensors, whatever cuda_graph asks."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.version, "hip", hip)
    reason = cuda_graph_unsupported()
    decoder = build(tiny_gpt2).requires_grad_(False)
    on_cuda = SimpleNamespace(is_cuda=True)  # what can_capture reads of the image tokens
    if words is None:
        assert reason is None
        assert decoder.can_capture(on_cuda, True)
    else:
        assert all(w in reason for w in words), reason
        assert torch.__version__ in reason
        assert not decoder.can_capture(on_cuda, True)
    assert not decoder.can_capture(on_cuda, False)
    assert not decoder.can_capture(torch.zeros(1), True)  # CPU tensors: eager
    decoder.wte.weight.requires_grad_(True)  # a decoder being trained: eager
    assert not decoder.can_capture(on_cuda, True)


def reference_beam_candidates(decoder, feat, beam_size, max_len, eot):
    """Plain, uncached: every step each live beam offers all its continuations and each ended beam
    itself unchanged; the best beam_size stay. One image; its final beams, best first."""
    memory = decoder.memory(feat)
    beams = [([], 0.0, False)]
    for t in range(max_len):
        candidates = []
        for tokens, score, ended in beams:
            if ended:
                candidates.append((score, tokens, True))
                continue
            logp = decoder(torch.tensor([[eot] + tokens]), memory)[0][0, -1].float().log_softmax(-1)
            candidates += [(score + float(logp[v]), tokens + ([] if v == eot else [v]), v == eot)
                           for v in range(logp.numel()) if not (t == 0 and v == eot)]
        beams = [(tokens, score, ended) for score, tokens, ended in sorted(candidates, key=lambda c: -c[0])[:beam_size]]
        if all(ended for _, _, ended in beams):
            break
    return [tokens for tokens, _, _ in beams]


@pytest.mark.parametrize("beam_size", [1, 3, 5])
def test_beam_candidates_equal_reference(beam_size):
    """The K final beams of each image, image-major, best first; K = 1 is greedy decoding."""
    decoder, feats = small_vocab_decoder()
    with torch.no_grad():
        batched = decoder.beam_candidates(feats, beam_size, 12, 15)
        reference = [c for b in range(16) for c in reference_beam_candidates(decoder, feats[b:b + 1], beam_size, 12, 15)]
    assert batched == reference
    if beam_size == 1:
        assert batched == uncached_greedy(decoder, feats, 12, 15)
    else:
        assert all(len({tuple(c) for c in batched[b * beam_size:(b + 1) * beam_size]}) == beam_size for b in range(16))
    lengths = {len(c) for c in batched}
    assert min(lengths) < 12 and max(lengths) == 12 and 15 not in {t for c in batched for t in c}


def test_sampling_shares_each_image_among_its_samples():
    """n samples per image, image-major; top_k = 1 leaves only the likeliest token: greedy, n times."""
    decoder, feats = small_vocab_decoder()
    with torch.no_grad():
        samples = decoder.sample(feats, 3, 12, 15, top_k=1, generator=torch.Generator().manual_seed(0))
        greedy = uncached_greedy(decoder, feats, 12, 15)
    assert samples == [caption for caption in greedy for _ in range(3)]


def test_sampling_draws_only_among_the_kept_tokens():
    decoder, feats = small_vocab_decoder()
    with torch.no_grad():
        free = decoder.sample(feats, 4, 12, 15, generator=torch.Generator().manual_seed(0))
        top2 = decoder.sample(feats, 4, 12, 15, top_k=2, generator=torch.Generator().manual_seed(0))
        first = decoder(torch.full((16, 1), 15), decoder.memory(feats))[0][:, -1]  # [16, V]
    allowed = first.topk(3, dim=-1).indices.tolist()  # the end token cannot come first: top 2 of the other 15
    assert all(c[0] in allowed[i // 4] for i, c in enumerate(top2))
    assert len({t for c in free for t in c}) > len({t for c in top2 for t in c})
    assert all(len(c) >= 1 and 15 not in c for c in free + top2)


def test_sample_next_top_k_and_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).log_softmax(-1).repeat(2000, 1)  # p = .64 .24 .09 .03
    draw = lambda **kw: sample_next(logits, generator=torch.Generator().manual_seed(0), **kw).tolist()
    assert set(draw(top_k=1)) == {0}
    assert set(draw(top_k=2)) == {0, 1}
    assert set(draw(top_p=0.8)) == {0, 1}  # 0.64 < 0.8 <= 0.64 + 0.24
    assert set(draw(top_p=0.5)) == {0}
    everything = draw()
    assert set(everything) == {0, 1, 2, 3} and abs(everything.count(0) / 2000 - 0.64) < 0.04


def test_beam_search_never_returns_empty_or_end_tokens(tiny_gpt2):
    decoder = build(tiny_gpt2)
    perturb_new_parameters(decoder)
    with torch.no_grad():
        decoder.ln_f.bias.add_(decoder.wte.weight[EOT_ID] / decoder.wte.weight[EOT_ID].norm() ** 2 * 5.0)  # EOT_ID always best
        feats = torch.randn(3, 7, 48)
        for captions in (decoder.beam_search(feats, 1, 6, EOT_ID), decoder.beam_search(feats, 3, 6, EOT_ID, 0.5)):
            assert all(len(c) >= 1 and EOT_ID not in c for c in captions)


def test_cross_attention_weights(tiny_gpt2):
    decoder = build(tiny_gpt2)
    idx = torch.randint(0, EOT_ID, (2, 5))
    with torch.no_grad():
        _, att = decoder(idx, decoder.memory(torch.randn(2, 7, 48)))
    assert att.shape == (2, 2, 5, 7)  # [N, H, T, S]
    torch.testing.assert_close(att.sum(-1), torch.ones(2, 2, 5))


def test_context_overflow_is_an_error(tiny_gpt2):
    decoder = build(tiny_gpt2)
    with pytest.raises(ValueError, match="exceeds GPT-2's context of 64"):
        decoder(torch.zeros(1, 65, dtype=torch.long), decoder.memory(torch.randn(1, 3, 48)))


def test_the_shape_is_never_defaulted():
    """GPT-2's shape and the encoder's width come from the weights, never from defaults."""
    with pytest.raises(TypeError, match="n_layer.*n_embd.*vocab_size.*n_ctx.*encoder_width"):
        DecoderConfig()


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_embd=100), "multiple of the head width"),
    (dict(cross_layers=[12]), "cross_layers [12] out of range"),
    (dict(adapter_dim=8, adapter_places=["ffn"]), "adapter_places ['ffn']"),
    (dict(lora_rank=4, lora_targets=["attn.q"]), "lora_targets ['attn.q']"),
    (dict(lora_rank=4, lora_alpha=0.0), "lora_alpha must be > 0"),
])
def test_bad_configs_fail_clearly(kwargs, message):
    with pytest.raises(ValueError) as error:
        DecoderConfig(**{**GPT2_SMALL, "encoder_width": 1024, **kwargs})
    assert message in str(error.value)


@pytest.mark.parametrize("hidden", [0, 32])
def test_a_fresh_prefix_learns_from_the_first_step(tiny_gpt2, hidden):
    """The prefix values start at zero (so a fresh model is GPT-2) yet get gradients at once;
    after one step, everything in the prefix does (no zero gate to open first)."""
    decoder = build(tiny_gpt2, prefix_len=4, prefix_hidden=hidden)
    assert (decoder.prefix()[:, 1] == 0).all() and (decoder.prefix()[:, 0] != 0).any()
    idx = torch.randint(0, EOT_ID + 1, (2, 6))
    feats = torch.randn(2, 5, 48)
    params = [p for n, p in decoder.named_parameters() if n.startswith("prefix.")]
    for step in range(2):
        decoder(idx, decoder.memory(feats))[0].log_softmax(-1)[..., 7].mean().backward()
        grads = [p.grad if p.grad is not None else torch.zeros(1) for p in params]
        if step == 0:
            assert any(g.abs().sum() > 0 for g in grads)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(0.1 * g)
                    p.grad = None
        else:
            assert all(g.abs().sum() > 0 for g in grads)
