"""hw3_download.sh and hw3_cache.py without the network: wget, gdown and
CLIP's downloader are replaced by stubs that copy local files, so the script
itself runs; the files must land exactly where hw3_1.sh and hw3_2.sh look."""
import json
import os
import subprocess
import sys

import pytest
from conftest import TINY_VIT, TINY_VIT_KWARGS

import encoder
import hw3_cache
import io_utils
import p1_zeroshot
import script_rules
import tokenizer
from captioner import Captioner, make_config, mark_trainable, save_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPENAI = "https://openaipublic.blob.core.windows.net/gpt-2/models/124M/"
DRIVE_URL = "https://drive.google.com/uc?id=1AbC-xyz&export=download"

# wget / gdown stand-in: logs its call, writes the file the URL names from local copies.
DOWNLOADER = """#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
target, url = args[args.index("-O") + 1], args[-1]
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0]), url, target]) + "\\n")
name = url.rsplit("/", 1)[-1]
source = os.path.join(os.environ["STUB_GPT2"], name) if name in ("encoder.json", "vocab.bpe") else os.environ["STUB_CKPT"]
shutil.copyfile(source, target)
"""
# openai/CLIP stand-in: clip.load "downloads" by writing a file into download_root.
FAKE_CLIP = """import json, os
FILES = {"ViT-B/32": "ViT-B-32.pt", "ViT-L/14": "ViT-L-14.pt", "ViT-L/14@336px": "ViT-L-14-336px.pt"}
def available_models():
    return list(FILES)
class _Model:
    def eval(self):
        return self
def load(name, device="cpu", jit=False, download_root=None):
    os.makedirs(download_root, exist_ok=True)
    with open(os.path.join(download_root, FILES[name]), "w") as f:
        f.write("stub")
    with open(os.environ["STUB_LOG"], "a") as f:
        f.write(json.dumps(["clip.load", name, download_root]) + "\\n")
    return _Model(), None
"""


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_vit_file, tiny_gpt2):
    model = Captioner(make_config("adapter", encoder=TINY_VIT, encoder_kwargs=TINY_VIT_KWARGS, adapter_dim=16),
                      tiny_gpt2[0], encoder_weights=tiny_vit_file)
    mark_trainable(model, verbose=False)
    path = tmp_path_factory.mktemp("dl_ckpt") / "model.pt"
    save_checkpoint(model, str(path))
    return str(path)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private, empty cache; nothing points anywhere else."""
    root = tmp_path / "cache"
    monkeypatch.setenv("HW3_CACHE", str(root))
    for name in ("HW3_P2_CKPT", "HW3_BPE_DIR"):
        monkeypatch.delenv(name, raising=False)
    return root


def run_download(tmp_path, url, tiny_checkpoint, bpe_dir):
    """`bash hw3_download.sh` with P2_CKPT_URL set to `url`, every downloader stubbed."""
    stubs = tmp_path / "stubs"
    (stubs / "clip").mkdir(parents=True)
    (stubs / "clip" / "__init__.py").write_text(FAKE_CLIP)
    for name in ("wget", "gdown"):
        (stubs / name).write_text(DOWNLOADER.format(python=sys.executable))
        (stubs / name).chmod(0o755)
    with open(os.path.join(REPO, "hw3_download.sh"), encoding="utf-8") as f:
        script = f.read()
    assert 'P2_CKPT_URL=""\n' in script
    (tmp_path / "hw3_download.sh").write_text(script.replace('P2_CKPT_URL=""', f'P2_CKPT_URL="{url}"'))
    env = {k: v for k, v in os.environ.items() if k not in ("HW3_P2_CKPT", "HW3_BPE_DIR")}
    env.update(PATH=f"{stubs}{os.pathsep}{env['PATH']}", PYTHONPATH=str(stubs), HW3_CACHE=str(tmp_path / "cache"),
               STUB_LOG=str(tmp_path / "log.jsonl"), STUB_GPT2=bpe_dir, STUB_CKPT=tiny_checkpoint)
    result = subprocess.run(["bash", str(tmp_path / "hw3_download.sh")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    with open(tmp_path / "log.jsonl", encoding="utf-8") as f:
        log = [json.loads(line) for line in f]
    return result, log


def place(path, content=b"weights"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)


# ---------------------------------------------------------------- the scripts

def test_scripts_follow_the_rules(tmp_path):
    assert script_rules.check_script(os.path.join(REPO, "hw3_download.sh")) == []
    with open(os.path.join(REPO, "hw3_download.sh"), encoding="utf-8") as f:
        filled = f.read().replace('P2_CKPT_URL=""', f'P2_CKPT_URL="{DRIVE_URL}"')
    (tmp_path / "hw3_download.sh").write_text(filled)
    assert script_rules.check_script(str(tmp_path / "hw3_download.sh")) == []
    with open(os.path.join(REPO, "hw3_2.sh"), encoding="utf-8") as f:
        assert f.read().splitlines()[-1] == 'HF_HUB_OFFLINE=1 python3 p2_inference.py -- "$1" "$2" "$3"'


def test_download_fills_the_places_the_scripts_read(tmp_path, cache, tiny_checkpoint, bpe_dir):
    place(encoder.cached_weights_path(TINY_VIT))  # already fetched: the step must not download
    result, log = run_download(tmp_path, DRIVE_URL, tiny_checkpoint, bpe_dir)
    assert result.returncode == 0, result.stderr

    checkpoint = io_utils.p2_checkpoint()
    assert checkpoint == str(cache / "p2_checkpoint.pt") == hw3_cache.target("checkpoint")
    assert ["gdown", DRIVE_URL, checkpoint + ".part"] in log  # a Drive link goes to gdown
    with open(checkpoint, "rb") as a, open(tiny_checkpoint, "rb") as b:
        assert a.read() == b.read()
    assert io_utils.existing_p2_checkpoint() == checkpoint

    assert not [e for e in log if e[0] == "wget"]  # the clone carries GPT-2's vocabulary: nothing to fetch
    assert tokenizer.find_vocab_dir() == tokenizer.REPO_ROOT
    assert tokenizer.BPETokenizer().encode("a man riding a bike.") == [64, 582, 10311, 257, 7161, 13]

    clip_root = io_utils.cache_dir("clip")
    assert [e for e in log if e[0] == "clip.load"] == [
        ["clip.load", name, clip_root] for name in p1_zeroshot.model_specs(p1_zeroshot.DEFAULT_MODELS)]
    assert f"encoder {TINY_VIT} is in" in result.stderr  # the checkpoint's encoder, not the default
    assert not [n for _, _, names in os.walk(cache) for n in names if n.endswith(".part")]


def test_unset_checkpoint_url_is_loud_and_fails_after_the_rest(tmp_path, cache, tiny_checkpoint, bpe_dir):
    place(encoder.cached_weights_path(encoder.DEFAULT_ENCODER))
    result, log = run_download(tmp_path, "", tiny_checkpoint, bpe_dir)
    assert result.returncode != 0
    assert "P2_CKPT_URL" in result.stderr and "NOT downloaded" in result.stderr
    assert not os.path.exists(io_utils.p2_checkpoint())
    assert [e[0] for e in log] == ["clip.load", "clip.load"]  # the rest still came
    assert f"encoder {encoder.DEFAULT_ENCODER} is in" in result.stderr


# ---------------------------------------------------------------- hw3_cache steps

def empty_folders(root):
    return [folder for folder, dirs, files in os.walk(root) if not dirs and not files]


def test_a_bad_download_is_not_installed_and_leaves_nothing(cache):
    part = hw3_cache.part("checkpoint")
    place(part, b"<!DOCTYPE html><html>Google Drive - Virus scan warning</html>")
    with pytest.raises(io_utils.InputError, match="not usable"):
        hw3_cache.install_checkpoint()
    assert not os.path.exists(part) and not os.path.exists(hw3_cache.target("checkpoint"))
    assert not cache.exists()  # no empty cache folder either

    hw3_cache.main(["part", "checkpoint"])
    place(part, b"")  # wget -O leaves an empty file when the download fails
    hw3_cache.main(["discard", "checkpoint"])
    assert not cache.exists()
    with pytest.raises(io_utils.InputError, match="download failed"):
        hw3_cache.install_checkpoint()  # nothing downloaded at all
    assert not cache.exists()


def test_discard_keeps_what_else_the_cache_holds(cache):
    place(str(cache / "clip" / "ViT-B-32.state_dict.pt"))
    place(hw3_cache.part("checkpoint"), b"half a file")
    hw3_cache.discard("checkpoint")
    assert sorted(os.listdir(cache)) == ["clip"] and empty_folders(cache) == []


def test_encoder_step_fetches_what_the_checkpoint_names(cache, monkeypatch, tiny_checkpoint):
    calls = []
    monkeypatch.setattr(encoder, "download_weights", lambda name: calls.append(name) or "path")
    hw3_cache.fetch_encoder()  # no checkpoint yet: the default encoder
    monkeypatch.setenv("HW3_P2_CKPT", tiny_checkpoint)
    hw3_cache.fetch_encoder()
    assert calls == [encoder.DEFAULT_ENCODER, TINY_VIT]

    def offline(name):
        raise OSError("network unreachable")
    monkeypatch.setattr(encoder, "download_weights", offline)
    with pytest.raises(io_utils.InputError, match=f"could not download encoder weights '{TINY_VIT}'.*unreachable"):
        hw3_cache.fetch_encoder()


def test_clip_step_fetches_problem_1_models(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(p1_zeroshot, "load_clip", lambda spec, device: calls.append((spec, device.type)))
    assert hw3_cache.fetch_clip() == ["ViT-L/14", "ViT-L/14@336px"]
    assert calls == [("ViT-L/14", "cpu"), ("ViT-L/14@336px", "cpu")]


def test_unknown_names_are_refused(cache):
    with pytest.raises(SystemExit, match="unknown download"):
        hw3_cache.main(["part", "weights.bin"])
    with pytest.raises(SystemExit, match="unknown download 'clip'"):
        hw3_cache.main(["install", "clip"])
    with pytest.raises(SystemExit, match="unknown download 'encoder.json'"):
        hw3_cache.main(["discard", "encoder.json"])
