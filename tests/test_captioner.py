"""The captioner as a whole: timm encoder loading, what trains, and the self-describing checkpoint."""
import json
import os

import pytest
import torch
from conftest import TINY_VIT, TINY_VIT_KWARGS
from PIL import Image

import captioner
from captioner import (
    Captioner,
    load_checkpoint,
    make_config,
    mark_trainable,
    save_checkpoint,
    trainable_state,
)
from decoder import parameter_group
from encoder import ImageEncoder
from weights import torch_load

PEFT_OVERRIDES = {  # tiny versions of each preset
    "none": {},
    "adapter": dict(adapter_dim=16),
    "prefix": dict(prefix_len=4, prefix_hidden=32),
    "lora": dict(lora_rank=4, lora_alpha=8.0),
}


def tiny_config(peft, **overrides):
    return make_config(peft, encoder=TINY_VIT, encoder_kwargs=TINY_VIT_KWARGS,
                       **{**PEFT_OVERRIDES[peft], **overrides})


def tiny_model(tiny_vit_file, tiny_gpt2, peft="adapter", **overrides):
    model = Captioner(tiny_config(peft, **overrides), tiny_gpt2[0], encoder_weights=tiny_vit_file)
    mark_trainable(model, verbose=False)
    return model


def images(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


def perturb(model, std=0.05):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, std)


# -- encoder -------------------------------------------------------------------


def test_encoder_loads_a_local_file_and_is_frozen(tiny_vit_file):
    import timm

    encoder = ImageEncoder(TINY_VIT, weights=tiny_vit_file, model_kwargs=TINY_VIT_KWARGS)
    reference = timm.create_model(TINY_VIT, pretrained=False, **TINY_VIT_KWARGS)
    reference.load_state_dict(torch.load(tiny_vit_file))
    x = images()
    torch.testing.assert_close(encoder(x), reference.eval().forward_features(x))
    assert encoder.width == 64 and encoder.grid == (4, 4) and encoder.prefix_tokens == 1
    assert encoder(x).shape == (2, 17, 64)  # [B, S, width]: class token + 4x4 patches
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.vit.training  # dropout and the like stay off
    assert encoder.transform(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


def test_encoder_weights_that_do_not_fit_are_an_error(tmp_path, tiny_vit_file):
    state = torch.load(tiny_vit_file)
    del state["blocks.1.mlp.fc1.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="not in the file.*blocks.1.mlp.fc1.weight"):
        ImageEncoder(TINY_VIT, weights=str(tmp_path / "partial.pth"), model_kwargs=TINY_VIT_KWARGS)
    wider = dict(TINY_VIT_KWARGS, embed_dim=128)  # another width: one line naming a tensor and both shapes
    with pytest.raises(ValueError, match=r"tensor '[a-z_.0-9]+' has shape \(.*64.*\), the model expects \(.*128.*\): "
                                         r"the file holds another model's weights or another size's"):
        ImageEncoder(TINY_VIT, weights=tiny_vit_file, model_kwargs=wider)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageEncoder(TINY_VIT, weights=str(tmp_path / "absent.pth"), model_kwargs=TINY_VIT_KWARGS)
    with pytest.raises(ValueError, match="not a timm model"):
        ImageEncoder("vit_nonexistent_patch3", pretrained=False)


def test_encoder_weights_with_nan_are_refused_naming_the_tensor(tmp_path, tiny_vit_file):
    """As for the checkpoint and GPT-2: NaN image tokens would caption every image '!!!!'."""
    state = torch.load(tiny_vit_file)
    state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match=r"nan.pth: 1 tensor\(s\) hold NaN or inf.*blocks.0.attn.qkv.weight"):
        ImageEncoder(TINY_VIT, weights=str(tmp_path / "nan.pth"), model_kwargs=TINY_VIT_KWARGS)

def test_no_silent_download_when_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HW3_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="hw3_download.sh"):
        ImageEncoder(TINY_VIT, model_kwargs=TINY_VIT_KWARGS)


def test_encoder_reads_the_repository_cache(tmp_path, monkeypatch, tiny_vit_file):
    monkeypatch.setenv("HW3_CACHE", str(tmp_path))
    os.makedirs(tmp_path / "timm")
    state = torch.load(tiny_vit_file)
    torch.save(state, tmp_path / "timm" / (TINY_VIT + ".pth"))
    encoder = ImageEncoder(TINY_VIT, model_kwargs=TINY_VIT_KWARGS)
    torch.testing.assert_close(encoder.vit.cls_token, state["cls_token"])


# -- the whole model -----------------------------------------------------------


@pytest.mark.parametrize("peft", sorted(PEFT_OVERRIDES))
def test_fresh_captioner_equals_gpt2(tiny_vit_file, tiny_gpt2, peft):
    model = tiny_model(tiny_vit_file, tiny_gpt2, peft).eval()
    idx = torch.randint(0, 50257, (2, 9))
    with torch.no_grad():
        ours = model(model.encode(images()), idx)
        theirs = tiny_gpt2[1](idx).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("peft", sorted(PEFT_OVERRIDES))
def test_only_new_modules_train(tiny_vit_file, tiny_gpt2, peft):
    model = Captioner(tiny_config(peft), tiny_gpt2[0], encoder_weights=tiny_vit_file)
    counts = mark_trainable(model, verbose=False)
    expected = {"cross_attention", "visual_proj"} | ({peft} if peft != "none" else set())
    assert set(counts) == expected
    for name, param in model.named_parameters():
        assert param.requires_grad == (parameter_group(name) is not None), name
        if name.startswith("encoder.") or name.startswith("decoder.wte"):
            assert not param.requires_grad
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_config_and_encoder_width_are_recorded(tiny_vit_file, tiny_gpt2):
    model = tiny_model(tiny_vit_file, tiny_gpt2)
    decoder = model.config["decoder"]
    assert decoder["encoder_width"] == 64 and decoder["n_embd"] == 128 and decoder["n_layer"] == 2
    json.dumps(model.config)  # plain types only


@pytest.mark.parametrize("peft", sorted(PEFT_OVERRIDES))
def test_checkpoint_round_trip(tmp_path, tiny_vit_file, tiny_gpt2, peft):
    model = tiny_model(tiny_vit_file, tiny_gpt2, peft)
    perturb(model)
    model.eval()
    path = str(tmp_path / "model.pt")
    total = save_checkpoint(model, path)

    checkpoint = torch_load(path)  # tensors and plain containers only
    assert set(checkpoint) == {"config", "state_dict"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if peft == "prefix":  # the reparameterisation MLP is folded into the prefixes
        trainable = {n for n in trainable if not n.startswith("decoder.prefix.")} | {"decoder.prefix.kv"}
        assert checkpoint["config"]["decoder"]["prefix_hidden"] == 0
    assert set(checkpoint["state_dict"]) == trainable
    assert total == sum(t.numel() for t in checkpoint["state_dict"].values())

    loaded = load_checkpoint(path, tiny_gpt2[0], encoder_weights=tiny_vit_file)
    x, idx = images(3, seed=1), torch.randint(0, 50257, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(loaded.encode(x), idx), model(model.encode(x), idx), atol=1e-5, rtol=0)
        feats = model.encode(x)
        assert loaded.generate(feats, beam_size=3, max_len=5) == model.generate(feats, beam_size=3, max_len=5)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_saving_refuses_the_course_limit(tmp_path, tiny_vit_file, tiny_gpt2, monkeypatch):
    model = tiny_model(tiny_vit_file, tiny_gpt2)
    size = sum(t.numel() for t in trainable_state(model).values())
    monkeypatch.setattr(captioner, "MAX_TRAINABLE", size)
    with pytest.raises(ValueError, match="limit"):
        save_checkpoint(model, str(tmp_path / "big.pt"))
    assert not os.path.exists(tmp_path / "big.pt")


def test_loading_a_checkpoint_that_does_not_match_fails(tmp_path, tiny_vit_file, tiny_gpt2):
    model = tiny_model(tiny_vit_file, tiny_gpt2)
    path = str(tmp_path / "model.pt")
    save_checkpoint(model, path)
    checkpoint = torch.load(path)

    extra = {**checkpoint, "state_dict": {**checkpoint["state_dict"], "decoder.h.0.bogus": torch.zeros(1)}}
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="not in the model.*decoder.h.0.bogus"):
        load_checkpoint(str(tmp_path / "extra.pt"), tiny_gpt2[0], encoder_weights=tiny_vit_file)

    state = dict(checkpoint["state_dict"])
    state.pop("decoder.h.1.adapter_mlp.up.weight")
    torch.save({**checkpoint, "state_dict": state}, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not saved.*adapter_mlp.up.weight"):
        load_checkpoint(str(tmp_path / "missing.pt"), tiny_gpt2[0], encoder_weights=tiny_vit_file)

    torch.save(checkpoint["state_dict"], tmp_path / "bare.pt")  # the course's bare state_dict
    with pytest.raises(ValueError, match="not a captioner checkpoint"):
        load_checkpoint(str(tmp_path / "bare.pt"), tiny_gpt2[0], encoder_weights=tiny_vit_file)


def test_decoder_weights_of_another_shape_are_refused(tmp_path, tiny_vit_file, tiny_gpt2):
    from transformers import GPT2Config, GPT2Model

    model = tiny_model(tiny_vit_file, tiny_gpt2)
    save_checkpoint(model, str(tmp_path / "model.pt"))
    wider = GPT2Model(GPT2Config(n_layer=2, n_embd=192, n_head=3, vocab_size=50257, n_positions=64))
    torch.save(wider.state_dict(), tmp_path / "wider.bin")
    with pytest.raises(ValueError, match="n_embd=128.*n_embd=192"):
        load_checkpoint(str(tmp_path / "model.pt"), str(tmp_path / "wider.bin"), encoder_weights=tiny_vit_file)


def test_cross_attention_maps(tiny_vit_file, tiny_gpt2):
    model = tiny_model(tiny_vit_file, tiny_gpt2).eval()
    perturb(model)
    maps = model.cross_attention(model.encode(images(1)), [64, 582, 10311])
    assert maps.shape == (5, 4, 4)  # start, 3 tokens, end; 4x4 patch grid
    assert (maps >= 0).all() and (maps.sum((1, 2)) <= 1 + 1e-6).all()  # class token dropped


@pytest.mark.parametrize("peft", ["adapter", "prefix", "lora"])
def test_full_size_parameter_budget(peft):
    """The presets at full size (ViT-L/14 width 1024 + GPT-2 small) use 29-35M parameters."""
    from decoder import GPT2_SMALL, Decoder, DecoderConfig

    config = make_config(peft)
    decoder = Decoder(DecoderConfig(**{**GPT2_SMALL, **config["decoder"], "encoder_width": 1024}))
    trainable = {k: v for k, v in decoder.state_dict().items() if parameter_group(k) is not None}
    if peft == "prefix":  # saved folded: the prefixes, not the MLP
        trainable = {k: v for k, v in trainable.items() if not k.startswith("prefix.")}
        trainable["prefix.kv"] = decoder.prefix().detach()
    total = sum(t.numel() for t in trainable.values())
    assert 29_000_000 <= total < 35_000_000, total


def test_quickgelu_weights_are_fetched_under_the_plain_name(tmp_path, monkeypatch, tiny_vit_file):
    """timm 0.9.10 derives hub ids for `*_clip_quickgelu_*.openai` that a later release replaced."""
    import timm

    import encoder

    asked = []

    def fake_create_model(name, pretrained=False, **kwargs):
        asked.append((name, pretrained))
        model = timm.models.create_model(TINY_VIT, pretrained=False, **TINY_VIT_KWARGS)
        model.load_state_dict(torch.load(tiny_vit_file))
        return model

    monkeypatch.setenv("HW3_CACHE", str(tmp_path))
    monkeypatch.setattr(timm, "create_model", fake_create_model)
    path = encoder.download_weights("vit_large_patch14_clip_quickgelu_224.openai")
    assert asked == [("vit_large_patch14_clip_224.openai", True)]
    assert path == encoder.cached_weights_path("vit_large_patch14_clip_quickgelu_224.openai")
    assert path.startswith(str(tmp_path)) and torch.equal(torch.load(path)["cls_token"],
                                                          torch.load(tiny_vit_file)["cls_token"])


# -- what loading checks -------------------------------------------------------


@pytest.fixture
def saved(tmp_path, tiny_vit_file, tiny_gpt2):
    """A saved tiny adapter checkpoint: (path, its contents)."""
    path = str(tmp_path / "model.pt")
    save_checkpoint(tiny_model(tiny_vit_file, tiny_gpt2), path)
    return path, torch.load(path)


def load(path, tiny_vit_file, tiny_gpt2):
    return load_checkpoint(str(path), tiny_gpt2[0], encoder_weights=tiny_vit_file)


def test_a_checkpoint_with_nan_or_inf_is_refused(tmp_path, saved, tiny_vit_file, tiny_gpt2):
    _, checkpoint = saved
    for value in (float("nan"), float("inf")):
        state = {k: v.clone() for k, v in checkpoint["state_dict"].items()}
        state["decoder.h.1.cross.q.weight"][3, 5] = value
        torch.save({**checkpoint, "state_dict": state}, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match=r"bad.pt: 1 tensor\(s\) hold NaN or inf.*decoder.h.1.cross.q.weight"):
            load(tmp_path / "bad.pt", tiny_vit_file, tiny_gpt2)


def test_a_tensor_of_another_shape_is_a_clear_error(tmp_path, saved, tiny_vit_file, tiny_gpt2):
    """Names match, shapes do not: a ValueError naming the tensor, not torch's size-mismatch RuntimeError."""
    _, checkpoint = saved
    state = dict(checkpoint["state_dict"])
    state["decoder.h.0.adapter_mlp.down.bias"] = torch.zeros(5)
    torch.save({**checkpoint, "state_dict": state}, tmp_path / "reshaped.pt")
    with pytest.raises(ValueError, match=r"decoder.h.0.adapter_mlp.down.bias \(5,\), expected \(16,\)"):
        load(tmp_path / "reshaped.pt", tiny_vit_file, tiny_gpt2)


@pytest.mark.parametrize("generation, message", [
    (dict(beam_size=0, max_len=20, length_penalty=0.0), r"beam_size=0 is out of range; expected an integer in 1..20"),
    (dict(beam_size=3, max_len=63, length_penalty=0.0), r"max_len=63 is out of range; expected an integer in 1..62"),
    (dict(beam_size=3, max_len=20), r"missing \['length_penalty'\]"),
    (None, r"generation settings: expected a dict"),
])
def test_a_checkpoints_decoding_settings_are_checked_when_read(tmp_path, saved, tiny_vit_file, tiny_gpt2,
                                                                generation, message):
    """The tiny GPT-2 has 64 positions: a caption plus its start and end tokens fit in max_len <= 62."""
    _, checkpoint = saved
    config = dict(checkpoint["config"])
    if generation is None:
        del config["generation"]
    else:
        config["generation"] = generation
    torch.save({**checkpoint, "config": config}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=message):
        captioner.read_checkpoint(str(tmp_path / "odd.pt"))
    with pytest.raises(ValueError, match=message):
        load(tmp_path / "odd.pt", tiny_vit_file, tiny_gpt2)


def test_decoding_overrides_are_checked_against_the_decoder(saved, tiny_vit_file, tiny_gpt2):
    model = load(saved[0], tiny_vit_file, tiny_gpt2)
    assert model.generation(beam_size=2, max_len=None) == dict(beam_size=2, max_len=30, length_penalty=0.0)
    with pytest.raises(ValueError, match=r"max_len=63 is out of range; expected an integer in 1..62"):
        model.generate(model.encode(images(1)), max_len=63)


@pytest.mark.parametrize("name, value", [
    ("beam_size", 0), ("beam_size", 21), ("beam_size", 2.5), ("beam_size", True), ("beam_size", "5"),
    ("max_len", 0), ("max_len", 1023), ("max_len", float("inf")),
    ("length_penalty", -0.5), ("length_penalty", 1e308), ("length_penalty", float("nan")), ("length_penalty", None),
])
def test_check_generation_names_the_value_and_its_range(name, value):
    settings = {**captioner.GENERATION, name: value}
    with pytest.raises(ValueError) as error:
        captioner.check_generation(settings, 1024, "HW3_P2 settings")
    assert str(error.value).startswith(f"HW3_P2 settings: {name}={value!r} is out of range; expected ")
    assert captioner.check_generation({**captioner.GENERATION, "beam_size": 3.0, "length_penalty": 1}, 1024) == \
        dict(beam_size=3, max_len=30, length_penalty=1.0)


def test_files_that_are_not_checkpoints_say_what_they_are(tmp_path, tiny_gpt2):
    cases = {
        "page.pt": "is not a PyTorch weights file (it is an HTML page",
        "empty.pt": "is not a PyTorch weights file (it is empty)",
        tiny_gpt2[0]: "not a captioner checkpoint; expected a dict with 'config' and 'state_dict' (as p2_train.py "
                      "saves), found 28 GPT-2 tensors: it looks like the course's decoder_model.bin",
    }
    (tmp_path / "page.pt").write_text("<html><body>Sign in to continue</body></html>", encoding="utf-8")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, message in cases.items():
        with pytest.raises(ValueError) as error:
            captioner.read_checkpoint(str(tmp_path / name))
        assert message in str(error.value), str(error.value)


def test_the_model_modules_leave_caption_policy_to_inference():
    """The model modules import no CLIP: cutting captions to CLIP's context is p2_inference's policy."""
    import ast

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("captioner.py", "decoder.py", "encoder.py"):
        with open(os.path.join(repo, name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not {m for m in imported if m.split(".")[0] in ("clip", "clip_context")}, name
    assert not hasattr(captioner.Captioner, "captions")


# -- where the encoder's weights come from -------------------------------------


@pytest.fixture
def trained_from_a_file(tmp_path, monkeypatch, tiny_vit_file, tiny_gpt2):
    """A checkpoint trained with explicit encoder weights (a copy of the tiny ViT), an empty cache,
    no override, and a hub that fails the test if anyone asks it."""
    import shutil

    import encoder

    weights = tmp_path / "elsewhere" / "my_vit.pth"
    weights.parent.mkdir()
    shutil.copyfile(tiny_vit_file, weights)
    model = tiny_model(str(weights), tiny_gpt2)
    perturb(model)
    path = str(tmp_path / "model.pt")
    save_checkpoint(model, path)
    monkeypatch.setenv("HW3_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # even with the hub allowed, it is never asked
    monkeypatch.setattr(encoder, "download_weights", lambda name: pytest.fail(f"went to the hub for {name}"))
    return dict(path=path, weights=weights, model=model)


def test_a_checkpoint_records_the_encoder_file_it_was_trained_with(trained_from_a_file):
    import hashlib

    config = torch_load(trained_from_a_file["path"])["config"]
    weights = trained_from_a_file["weights"]
    assert config["encoder"]["weights_file"] == {
        "path": str(weights.resolve()), "bytes": weights.stat().st_size,
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert config["encoder"]["name"] == TINY_VIT


def test_inference_finds_the_recorded_file_without_the_hub(trained_from_a_file, tiny_gpt2):
    loaded = load_checkpoint(trained_from_a_file["path"], tiny_gpt2[0])  # no encoder weights named
    assert loaded.encoder.weights == str(trained_from_a_file["weights"].resolve())
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), trained_from_a_file["model"].encode(x))


@pytest.mark.parametrize("change", ["moved", "rewritten"])
def test_a_recorded_file_gone_or_changed_fails_at_once_saying_how_to_fix_it(trained_from_a_file, tiny_gpt2,
                                                                            monkeypatch, change):
    import timm

    weights = trained_from_a_file["weights"]
    if change == "moved":
        weights.rename(weights.with_name("moved.pth"))
    else:
        state = torch.load(weights)
        state["cls_token"] += 1
        torch.save(state, weights)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("built the ViT before finding weights"))
    with pytest.raises(FileNotFoundError) as error:
        load_checkpoint(trained_from_a_file["path"], tiny_gpt2[0])
    message = str(error.value)
    assert str(weights.resolve()) in message and "HW3_P2_ENCODER_WEIGHTS" in message and "hw3_download.sh" in message
    assert ("is no longer there" if change == "moved" else "has changed since") in message


def test_the_override_and_then_the_cache_stand_in_for_a_missing_recorded_file(trained_from_a_file, tiny_gpt2,
                                                                               tiny_vit_file, tmp_path):
    import shutil

    import encoder

    trained_from_a_file["weights"].unlink()
    loaded = load_checkpoint(trained_from_a_file["path"], tiny_gpt2[0], encoder_weights=tiny_vit_file)
    assert loaded.encoder.weights == tiny_vit_file
    cached = encoder.cached_weights_path(TINY_VIT)
    os.makedirs(os.path.dirname(cached))
    shutil.copyfile(tiny_vit_file, cached)
    assert load_checkpoint(trained_from_a_file["path"], tiny_gpt2[0]).encoder.weights == cached


def test_a_checkpoint_without_the_record_loads_from_the_cache_as_before(tmp_path, monkeypatch, tiny_vit_file,
                                                                        tiny_gpt2):
    """Checkpoints saved before the record existed, and those trained from the cache, hold none."""
    import shutil

    import encoder

    path = str(tmp_path / "old.pt")
    save_checkpoint(tiny_model(tiny_vit_file, tiny_gpt2), path)
    checkpoint = torch.load(path)
    del checkpoint["config"]["encoder"]["weights_file"]
    torch.save(checkpoint, path)
    monkeypatch.setenv("HW3_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1.*HW3_P2_ENCODER_WEIGHTS.*hw3_download.sh"):
        load_checkpoint(path, tiny_gpt2[0])
    cached = encoder.cached_weights_path(TINY_VIT)
    os.makedirs(os.path.dirname(cached))
    shutil.copyfile(tiny_vit_file, cached)
    loaded = load_checkpoint(path, tiny_gpt2[0])
    assert loaded.encoder.weights == cached
    resaved = str(tmp_path / "resaved.pt")
    mark_trainable(loaded, verbose=False)
    save_checkpoint(loaded, resaved)
    assert "weights_file" not in torch.load(resaved)["config"]["encoder"]  # the cache is no named file
