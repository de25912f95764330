"""Shared fixtures: tiny randomly initialised stand-ins for the real weights.

Nothing here downloads: the real CLIP / timm / GPT-2 weights cannot be
fetched on the test machines, so each test builds a small model of the same
architecture and saves it where the real loading code expects a file.
"""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# A hub miss retries for ~47 s before failing; tests must never reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def bpe_dir():
    """Folder with GPT-2's encoder.json and vocab.bpe: the repository root (committed there, as in the
    course's template), or $HW3_BPE_DIR when set."""
    path = os.environ.get("HW3_BPE_DIR") or REPO
    if not os.path.isfile(os.path.join(path, "encoder.json")):
        pytest.fail(f"GPT-2 vocabulary not found in HW3_BPE_DIR={path!r}")
    return path


@pytest.fixture(scope="session")
def tiny_clip_file(tmp_path_factory):
    """A random CLIP with OpenAI's architecture at toy size, saved as a state_dict.

    `clip.load(path)` rebuilds it from the tensor shapes exactly as it does
    the real ViT-B/32 file (heads = width / 64, so widths are multiples of 64).
    """
    import torch
    from clip.model import CLIP

    torch.manual_seed(0)
    model = CLIP(
        embed_dim=64, image_resolution=32, vision_layers=2, vision_width=64,
        vision_patch_size=8, context_length=77, vocab_size=49408,
        transformer_width=64, transformer_heads=1, transformer_layers=2,
    )
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_clip_archive(tmp_path_factory, tiny_clip_file):
    """tiny_clip_file's model as a TorchScript archive, the format of OpenAI's published files."""
    import warnings

    import torch
    from clip.model import CLIP

    from clip_weights import architecture

    state = torch.load(tiny_clip_file)
    model = CLIP(**architecture(state, tiny_clip_file))
    model.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes about CLIP's Python control flow
        traced = torch.jit.trace(model.eval(), (torch.zeros(1, 3, 32, 32), torch.zeros(1, 77, dtype=torch.long)))
    path = tmp_path_factory.mktemp("clip_archive") / "tiny_clip_jit.pt"
    traced.save(str(path))
    return str(path)


# timm ViT small enough for CPU training tests: 32x32 input, 8x8 patches (4x4 grid), width 64.
TINY_VIT = "vit_tiny_patch16_224"
TINY_VIT_KWARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)


@pytest.fixture(scope="session")
def tiny_vit_file(tmp_path_factory):
    """A random timm ViT (TINY_VIT with TINY_VIT_KWARGS) saved as a state_dict, head included."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(TINY_VIT, pretrained=False, **TINY_VIT_KWARGS)
    path = tmp_path_factory.mktemp("vit") / "tiny_vit.pth"
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """(path, model): a random 2-layer GPT-2 from `transformers` with GPT-2's vocabulary,
    its transformer's state_dict saved in the course's decoder_model.bin layout
    (no `transformer.` prefix, Conv1D weights as (in, out))."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=128, n_head=2, vocab_size=50257, n_positions=64)
    model = GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("gpt2") / "decoder_model.bin"
    torch.save(model.transformer.state_dict(), path)
    return str(path), model


@pytest.fixture(scope="session")
def captioning_setup(tmp_path_factory, tiny_vit_file, bpe_dir):
    """A synthetic captioning set in the course's layout, and a tiny GPT-2 that knows its language.

    Returns dict(data_root, decoder_weights, encoder_weights, encoder_args): what p2_train.py needs.
    """
    import json

    import torch

    import synthetic
    from p2_data import normalize_caption
    from tokenizer import BPETokenizer

    root = tmp_path_factory.mktemp("captioning")
    data_root = str(root / "p2_data")
    synthetic.make_dataset(data_root, n_train=200, n_val=30, image_size=32, seed=0)
    tokenizer = BPETokenizer()
    with open(os.path.join(data_root, "train.json"), encoding="utf-8") as f:
        captions = [tokenizer.encode(normalize_caption(a["caption"])) for a in json.load(f)["annotations"]]
    decoder_weights = str(root / "decoder_model.bin")
    torch.save(synthetic.pretrain_caption_lm(captions), decoder_weights)
    encoder_args = ["--encoder", TINY_VIT, "--encoder-weights", tiny_vit_file,
                    "--encoder-kwargs", json.dumps(TINY_VIT_KWARGS)]
    return dict(data_root=data_root, decoder_weights=decoder_weights, encoder_weights=tiny_vit_file,
                encoder_args=encoder_args)


def train_args(setup, out, *extra):
    """p2_train.py arguments for a quick CPU run on the captioning setup."""
    return ["--data-root", setup["data_root"], "--decoder-weights", setup["decoder_weights"], "--out", str(out),
            *setup["encoder_args"], "--device", "cpu", "--batch-size", "32", "--lr", "3e-3",
            "--warmup-steps", "5", "--max-len", "16", "--log-every", "5", *extra]


def small_copy(setup: dict, root, n_train: int = 40) -> dict:
    """The captioning setup with its first n_train training images (5 captions each) copied to root."""
    import json
    import shutil

    shutil.copytree(setup["data_root"], root)
    with open(os.path.join(root, "train.json"), encoding="utf-8") as f:
        data = json.load(f)
    data["images"] = data["images"][:n_train]
    kept = {image["id"] for image in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in kept]
    with open(os.path.join(root, "train.json"), "w", encoding="utf-8") as f:
        json.dump(data, f)
    return dict(setup, data_root=str(root))


@pytest.fixture(scope="module")
def small_setup(tmp_path_factory, captioning_setup):
    """The captioning setup with its first 40 training images only (200 captions), one copy per test module."""
    return small_copy(captioning_setup, tmp_path_factory.mktemp("small") / "data")


def disk_full(monkeypatch, code: str = "ENOSPC") -> None:
    """From now on every write through file_io's open fails as a full disk (errno `code`) would."""
    import errno

    import file_io

    real_open = open

    def full(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode:
            number = getattr(errno, code)
            f.write = lambda data: (_ for _ in ()).throw(OSError(number, os.strerror(number)))
        return f

    monkeypatch.setattr(file_io, "open", full, raising=False)


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, captioning_setup):
    """A tiny adapter captioner trained by `p2_train.py` on the synthetic set (3 epochs, no SCST)."""
    import subprocess

    out = tmp_path_factory.mktemp("trained") / "adapter.pt"
    args = train_args(captioning_setup, out, "--peft", "adapter", "--adapter-dim", "32", "--epochs", "3",
                      "--scst-epochs", "0", "--cache-features", str(out.parent / "features"),
                      "--decode-beams", "1", "3", "--decode-length-penalties", "0")
    result = subprocess.run([sys.executable, os.path.join(REPO, "p2_train.py"), *args], cwd=REPO,
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return str(out)
