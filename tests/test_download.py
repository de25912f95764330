"""hw3_download.sh and hw3_cache.py without the network: wget and gdown are
replaced by stubs that copy local files, and OpenAI's CLIP URLs by file:// URLs
of a tiny archive in OpenAI's format (its SHA-256 in the URL, as OpenAI's), so
the script itself runs; the files must land exactly where hw3_1.sh and hw3_2.sh
look, and a failed download must leave nothing behind."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import TINY_VIT, TINY_VIT_KWARGS

import clip_weights
import encoder
import hw3_cache
import io_utils
import p1_zeroshot
import script_rules
import tokenizer
from captioner import Captioner, make_config, mark_trainable, save_checkpoint
from weights import torch_load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVE_URL = "https://drive.google.com/uc?id=1AbC-xyz&export=download"

# wget / gdown stand-in: logs its call, writes the checkpoint; with STUB_FAIL, leaves an empty file and fails.
DOWNLOADER = """#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
target, url = args[args.index("-O") + 1], args[-1]
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0]), url, target]) + "\\n")
if os.environ.get("STUB_FAIL"):
    open(target, "w").close()
    sys.exit(1)
shutil.copyfile(os.environ["STUB_CKPT"], target)
"""
# OpenAI's CLIP URLs replaced (in every Python process of the script) by STUB_CLIP_MODELS' file:// URLs.
SITECUSTOMIZE = """import json, os
if os.environ.get("STUB_CLIP_MODELS"):
    import clip.clip
    clip.clip._MODELS.update(json.loads(os.environ["STUB_CLIP_MODELS"]))
"""


def openai_like(folder, archive, names, damage=None):
    """{name: file:// URL} serving `archive` as OpenAI serves CLIP: at .../<SHA-256>/<file name>.
    damage="checksum": the file differs from its checksum; "missing": nothing at the URL."""
    with open(archive, "rb") as f:
        data = f.read()
    urls = {}
    for name in names:
        sha = hashlib.sha256(data).hexdigest()
        path = folder / sha / os.path.basename(clip_weights.openai_models()[name])
        path.parent.mkdir(parents=True, exist_ok=True)
        if damage != "missing":
            path.write_bytes(data + (b"\0" if damage == "checksum" else b""))
        urls[name] = path.as_uri()
    return urls


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


def run_download(tmp_path, url, tiny_checkpoint, clip_archive, fail=False, clip_damage=None):
    """`bash hw3_download.sh` with P2_CKPT_URL set to `url`, every downloader stubbed."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "sitecustomize.py").write_text(SITECUSTOMIZE)
    models = openai_like(tmp_path / "openai", clip_archive, p1_zeroshot.model_specs(p1_zeroshot.DEFAULT_MODELS),
                         clip_damage)
    for name in ("wget", "gdown"):
        (stubs / name).write_text(DOWNLOADER.format(python=sys.executable))
        (stubs / name).chmod(0o755)
    with open(os.path.join(REPO, "hw3_download.sh"), encoding="utf-8") as f:
        script = f.read()
    assert 'P2_CKPT_URL=""\n' in script
    (tmp_path / "hw3_download.sh").write_text(script.replace('P2_CKPT_URL=""', f'P2_CKPT_URL="{url}"'))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HW3_", "HF_HUB_OFFLINE"))}
    env.update(PATH=f"{stubs}{os.pathsep}{env['PATH']}", PYTHONPATH=str(stubs), HW3_CACHE=str(tmp_path / "cache"),
               STUB_LOG=str(tmp_path / "log.jsonl"), STUB_CKPT=tiny_checkpoint, STUB_CLIP_MODELS=json.dumps(models))
    if fail:
        env["STUB_FAIL"] = "1"
    result = subprocess.run(["bash", str(tmp_path / "hw3_download.sh")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    log = []
    if (tmp_path / "log.jsonl").exists():
        log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text(encoding="utf-8").splitlines()]
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


def test_download_fills_the_places_the_scripts_read(tmp_path, cache, tiny_checkpoint, tiny_clip_archive,
                                                     tiny_clip_file):
    place(encoder.cached_weights_path(TINY_VIT))  # already fetched: the step must not download
    result, log = run_download(tmp_path, DRIVE_URL, tiny_checkpoint, tiny_clip_archive)
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

    # CLIP: OpenAI's archives checked and converted to plain weights, the archives gone
    names = p1_zeroshot.model_specs(p1_zeroshot.DEFAULT_MODELS)
    assert sorted(os.listdir(cache / "clip")) == sorted(os.path.basename(clip_weights.cached_path(n)) for n in names)
    expected = torch.load(tiny_clip_file)
    for name in names:
        state = torch_load(clip_weights.cached_path(name))
        assert sorted(state) == sorted(expected) and all(torch.equal(state[k], expected[k]) for k in expected)
        assert "checked (SHA-256) and converted" in result.stderr
    assert f"encoder {TINY_VIT} is in" in result.stderr  # the checkpoint's encoder, not the default
    assert not [n for _, _, names in os.walk(cache) for n in names if n.endswith(".part")]


@pytest.mark.parametrize("case", ["target links to the user's file", "a leftover .part links to the user's file",
                                  "target is a folder"])
def test_download_never_writes_over_or_through_what_the_cache_holds(tmp_path, cache, tiny_checkpoint,
                                                                    tiny_clip_archive, case):
    """The user's own checkpoint behind a link in the cache stays as it is; a target that cannot take the
    download is refused before downloading, in one line."""
    place(encoder.cached_weights_path(TINY_VIT))  # already fetched: no network needed
    mine = tmp_path / "runs" / "lora.pt"
    place(str(mine), b"the user's trained run")
    checkpoint = cache / "p2_checkpoint.pt"
    if case == "target is a folder":
        checkpoint.mkdir(parents=True)
    else:
        link = checkpoint if case.startswith("target") else cache / "p2_checkpoint.pt.part"
        link.symlink_to(mine)
    result, log = run_download(tmp_path, DRIVE_URL, tiny_checkpoint, tiny_clip_archive)
    assert mine.read_bytes() == b"the user's trained run"
    assert "Traceback" not in result.stderr
    if case.startswith("a leftover"):
        assert result.returncode == 0, result.stderr
        assert checkpoint.read_bytes() == open(tiny_checkpoint, "rb").read()
    else:
        assert result.returncode == 1
        assert not [e for e in log if e[0] in ("gdown", "wget")]  # refused before downloading
        expected = ("error: output path " + repr(str(checkpoint)) + " is a folder; expected a file name"
                    if case == "target is a folder" else f"error: {checkpoint} is a symbolic link to {str(mine)!r}")
        assert expected in result.stderr, result.stderr[-2000:]
        assert os.path.islink(checkpoint) or os.path.isdir(checkpoint)


def test_unset_checkpoint_url_is_loud_and_fails_after_the_rest(tmp_path, cache, tiny_checkpoint,
                                                               tiny_clip_archive):
    place(encoder.cached_weights_path(encoder.DEFAULT_ENCODER))
    result, log = run_download(tmp_path, "", tiny_checkpoint, tiny_clip_archive)
    assert result.returncode != 0
    assert "P2_CKPT_URL" in result.stderr and "NOT downloaded" in result.stderr
    assert not os.path.exists(io_utils.p2_checkpoint()) and log == []
    for name in p1_zeroshot.model_specs(p1_zeroshot.DEFAULT_MODELS):  # the rest still came
        assert os.path.isfile(clip_weights.cached_path(name))
    assert f"encoder {encoder.DEFAULT_ENCODER} is in" in result.stderr


@pytest.mark.parametrize("clip_damage", ["missing", "checksum"])
def test_failed_downloads_leave_no_part_file_or_empty_folder(tmp_path, cache, tiny_checkpoint, tiny_clip_archive,
                                                             clip_damage):
    """wget fails (leaving an empty file, as `wget -O` does), CLIP's URL serves nothing or a file that is not
    OpenAI's: the script fails, naming each, and the cache holds nothing half-fetched."""
    place(encoder.cached_weights_path(encoder.DEFAULT_ENCODER))
    result, log = run_download(tmp_path, "https://example.com/ckpt.pt", tiny_checkpoint, tiny_clip_archive,
                               fail=True, clip_damage=clip_damage)
    assert result.returncode != 0 and [e[0] for e in log] == ["wget"]
    assert "some downloads failed" in result.stderr
    if clip_damage == "checksum":
        assert "has SHA-256" in result.stderr and "nothing installed" in result.stderr
    else:
        assert "could not download CLIP ViT-L/14" in result.stderr
    left = [os.path.join(folder, n) for folder, _, names in os.walk(cache) for n in names]
    assert left == [encoder.cached_weights_path(encoder.DEFAULT_ENCODER)]  # what was there before, only
    assert empty_folders(cache) == []


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
    monkeypatch.setattr(clip_weights, "fetch", lambda name: calls.append(name) or "path")
    assert hw3_cache.fetch_clip() == ["ViT-L/14", "ViT-L/14@336px"]
    assert calls == ["ViT-L/14", "ViT-L/14@336px"]


def test_clip_archive_left_by_clip_load_is_converted_without_a_download(cache, monkeypatch, tiny_clip_archive,
                                                                         tmp_path):
    """A cache filled by the former clip.load holds OpenAI's archive: when its checksum matches it is converted
    (offline), and deleted; a damaged one is downloaded again."""
    urls = openai_like(tmp_path / "openai", tiny_clip_archive, ["ViT-B/32"])
    monkeypatch.setitem(__import__("clip").clip._MODELS, "ViT-B/32", urls["ViT-B/32"])

    def offline(url, path):
        raise OSError("network unreachable")
    monkeypatch.setattr(clip_weights, "_download", offline)
    (cache / "clip").mkdir(parents=True)
    shutil.copyfile(tiny_clip_archive, cache / "clip" / "ViT-B-32.pt")
    assert clip_weights.fetch("ViT-B/32") == clip_weights.cached_path("ViT-B/32")
    assert os.listdir(cache / "clip") == ["ViT-B-32.state_dict.pt"]


def test_unknown_names_are_refused(cache):
    with pytest.raises(SystemExit, match="unknown download"):
        hw3_cache.main(["part", "weights.bin"])
    with pytest.raises(SystemExit, match="unknown download 'clip'"):
        hw3_cache.main(["install", "clip"])
    with pytest.raises(SystemExit, match="unknown download 'encoder.json'"):
        hw3_cache.main(["discard", "encoder.json"])
