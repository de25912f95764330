"""weights.skip_init and weights.assign_state: building a model from its files without initialising
what the files overwrite (issue 23), and the checks that make that safe."""
import pytest
import timm
import torch
import torch.nn as nn
from conftest import TINY_VIT, TINY_VIT_KWARGS

from captioner import load_checkpoint, read_checkpoint
from decoder import load_gpt2_state
from encoder import ImageEncoder
from weights import assign_state, skip_init, without_data


def test_skip_init_draws_nothing_and_restores_initialisation():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with skip_init():
        nn.Linear(64, 64), nn.Embedding(100, 8), nn.LayerNorm(8), nn.Conv2d(3, 8, 3)
        nn.init.normal_(torch.empty(4))
        nn.MultiheadAttention(16, 2)
    assert torch.equal(torch.get_rng_state(), before)  # no random draw for any of them
    nn.Linear(64, 64)
    assert not torch.equal(torch.get_rng_state(), before)  # initialisation is back after the block
    with skip_init(enabled=False):
        layer = nn.LayerNorm(8)
    assert torch.equal(layer.weight, torch.ones(8))


def test_skip_init_restores_even_when_the_build_fails():
    with pytest.raises(RuntimeError):
        with skip_init():
            raise RuntimeError("build failed")
    assert torch.equal(nn.LayerNorm(4).weight, torch.ones(4))


def test_assign_state_fills_converts_and_reports_what_is_left():
    with skip_init():
        model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    state = {"0.weight": torch.randn(3, 4, dtype=torch.float16), "0.bias": torch.randn(3)}
    left = assign_state(model, state, "file.pth")
    assert left == ["1.bias", "1.weight"]  # the caller must fill or refuse these
    assert model[0].weight.dtype == torch.float32 and torch.equal(model[0].weight, state["0.weight"].float())
    assert model[0].bias.data_ptr() == state["0.bias"].data_ptr()  # same dtype and device: no copy
    assert isinstance(model[0].weight, nn.Parameter)
    with pytest.raises(ValueError, match=r"^file.pth: tensor '0.weight' has shape \(4, 4\), the model expects \(3, 4\): "
                                         r"the file holds another model's weights or another size's \(e.g. another "
                                         r"encoder, preset, width or depth\)$"):
        assign_state(model, {"0.weight": torch.zeros(4, 4)}, "file.pth")
    with pytest.raises(ValueError, match=r"file.pth: 1 tensor.*the model does not have.*'2.weight'\]: the file holds"):
        assign_state(model, {"2.weight": torch.zeros(1)}, "file.pth")
    with pytest.raises(ValueError, match=r"^f: tensor '0.weight' has shape \(4, 4\), the model expects \(3, 4\): why$"):
        assign_state(model, {"0.weight": torch.zeros(4, 4), "0.bias": torch.zeros(7)}, "f", cause="why")  # the first


def test_without_data_keeps_names_shapes_dtypes_and_holds_no_memory():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).half()
    model[0].bias.requires_grad_(False)
    before = {name: (t.shape, t.dtype, t.requires_grad) for name, t in model.state_dict(keep_vars=True).items()}
    assert without_data(model) is model
    after = model.state_dict(keep_vars=True)
    assert {name: (t.shape, t.dtype, t.requires_grad) for name, t in after.items()} == before
    assert {t.device.type for t in after.values()} == {"meta"}  # parameters and buffers (running_mean...)
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    model.float()  # a conversion changes dtypes only
    assert model[0].weight.dtype == torch.float32 and model[0].weight.device.type == "meta"


def test_assign_state_across_devices_gives_the_model_s_dtype_on_the_target():
    """An fp16 file's tensor for an fp32 model, and an fp32 file's for an fp16 model, put on another
    device (meta stands in for a GPU): each arrives in the model's dtype and shape."""
    model = without_data(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2).half()))
    state = {"0.weight": torch.randn(3, 4, dtype=torch.float16), "0.bias": torch.randn(3),
             "1.weight": torch.randn(2, 3), "1.bias": torch.randn(2, dtype=torch.float16)}
    assert assign_state(model, state, "file.pth", device=torch.device("meta")) == []
    assert [(p.dtype, p.device.type, tuple(p.shape)) for p in model.parameters()] == [
        (torch.float32, "meta", (3, 4)), (torch.float32, "meta", (3,)),
        (torch.float16, "meta", (2, 3)), (torch.float16, "meta", (2,))]
    assign_state(model, state, "file.pth", device=torch.device("cpu"))  # and with data, the values
    assert torch.equal(model[0].weight, state["0.weight"].float())
    assert torch.equal(model[1].weight, state["1.weight"].half())


def test_encoder_built_without_initialisation_equals_the_initialised_one(tiny_vit_file):
    """The fast build (no random init, tensors assigned) computes what timm's model with the same
    weights loaded the ordinary way computes, and leaves the global random generator alone."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    fast = ImageEncoder(TINY_VIT, weights=tiny_vit_file, model_kwargs=TINY_VIT_KWARGS)
    assert torch.equal(torch.get_rng_state(), before)
    reference = timm.create_model(TINY_VIT, pretrained=False, num_classes=0, **TINY_VIT_KWARGS).eval()
    reference.load_state_dict({k: v for k, v in torch.load(tiny_vit_file).items() if not k.startswith("head.")})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fast(x), reference.forward_features(x))
    assert all(p.is_contiguous() for p in fast.parameters())


def test_encoder_reads_its_file_before_allocating_the_vit(tiny_vit_file, monkeypatch):
    """The file's tensors are read before the ViT's own (never written) tensors exist, so that they can
    take memory the process freed, not fresh pages (bench/RESULTS.md: 5.4x -> 1.41x the read on torch
    1.12); the model then holds the file's tensors themselves, not copies."""
    import encoder

    order, read = [], {}

    def reading(path, check=True):
        order.append("read")
        read.update(real_read(path, check))
        return read

    def creating(*args, **kwargs):
        order.append("build")
        return real_create(*args, **kwargs)

    real_read, real_create = encoder.read_state_dict, encoder._create_vit
    monkeypatch.setattr(encoder, "read_state_dict", reading)
    monkeypatch.setattr(encoder, "_create_vit", creating)
    model = ImageEncoder(TINY_VIT, weights=tiny_vit_file, model_kwargs=TINY_VIT_KWARGS)
    assert order == ["read", "build"]
    held = {p.data_ptr() for p in model.parameters()}
    assert held == {v.data_ptr() for k, v in read.items() if not k.startswith("head.")}


def test_checkpoint_loaded_without_initialisation_takes_every_tensor_from_a_file(trained_checkpoint,
                                                                                captioning_setup):
    """load_checkpoint builds the decoder without initialisation: each of its parameters must equal
    its source, GPT-2's file or the checkpoint (uninitialised memory would not)."""
    setup = captioning_setup
    model = load_checkpoint(trained_checkpoint, setup["decoder_weights"], setup["encoder_weights"])
    sources = {f"decoder.{k}": v for k, v in load_gpt2_state(setup["decoder_weights"]).items()}
    sources.update(read_checkpoint(trained_checkpoint)["state_dict"])
    sources.update({f"encoder.vit.{k}": v for k, v in torch.load(setup["encoder_weights"]).items()})
    for name, param in model.named_parameters():
        assert torch.equal(param, sources[name].float()), name
