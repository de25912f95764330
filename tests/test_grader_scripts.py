"""hw3_1.sh and hw3_2.sh as the graders run them: exactly three arguments, passed after `--` (a path
may begin with `-`), offline (HF_HUB_OFFLINE=1 set inside), and working with stderr closed (`2>&-`)."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import TINY_VIT, TINY_VIT_KWARGS
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"hw3_1.sh": ("p1_zeroshot.py", "IMG_DIR ID2LABEL_JSON OUT_CSV"),
           "hw3_2.sh": ("p2_inference.py", "IMG_DIR OUT_JSON DECODER_WEIGHTS")}
# Settings a developer's shell may hold; each run here sets its own.
HW3_SETTINGS = [k for k in os.environ if k.startswith("HW3_") or k in ("HF_HUB_OFFLINE", "HW3_DEMO_REPORT")]

# python3 stand-in: records its arguments and whether the hub was switched off, runs nothing.
FAKE_PYTHON = """#!{python}
import json, os, sys
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps([sys.argv[1:], os.environ.get("HF_HUB_OFFLINE")]) + "\\n")
"""


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in HW3_SETTINGS}
    env.update(CUDA_VISIBLE_DEVICES="", **extra)
    return env


def fake_python(tmp_path):
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "python3").write_text(FAKE_PYTHON.format(python=sys.executable))
    (stubs / "python3").chmod(0o755)
    log = tmp_path / "log.jsonl"
    env = clean_env(PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}", STUB_LOG=str(log))
    return env, log


def calls(log):
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_arguments_go_after_double_dash_with_the_hub_off(script, tmp_path):
    env, log = fake_python(tmp_path)
    args = ["-imgs", "--out file.json", "-h"]  # options to argparse, were they not after `--`
    result = subprocess.run(["bash", script, *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert calls(log) == [[[SCRIPTS[script][0], "--", *args], "1"]]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize("count", [0, 2, 4, 5])
def test_a_missing_or_extra_argument_is_refused_with_the_usage(script, count, tmp_path):
    env, log = fake_python(tmp_path)
    result = subprocess.run(["bash", script, *[f"arg{i}" for i in range(count)]], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == f"usage: bash {script} {SCRIPTS[script][1]} (3 arguments, {count} given)"
    assert calls(log) == []  # nothing ran


@pytest.mark.parametrize("argv", [["--", "-imgs", "-labels.json", "-out.csv"], ["-imgs", "x", "y", "z"]])
def test_p1_argparse_takes_paths_after_double_dash_only(argv, tmp_path, monkeypatch):
    """After `--` a name beginning with `-` is a path (here: one that does not exist, reported as such);
    without it, argparse takes it for an option."""
    import p1_zeroshot

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        p1_zeroshot.main(argv)
    if argv[0] == "--":
        assert "-labels.json" in str(info.value)
    else:
        assert info.value.code == 2


# ---------------------------------------------------------------- end to end, in a clone of symlinks

@pytest.fixture
def clone(tmp_path):
    """The repository's files linked into a fresh folder: the graders' working directory, where the
    test may create paths that begin with `-`."""
    root = tmp_path / "clone"
    root.mkdir()
    for name in os.listdir(REPO):
        if name.endswith((".py", ".sh", ".json", ".bpe")):
            os.symlink(os.path.join(REPO, name), root / name)
    return root


def noise_png(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path, format="PNG")


def run_script(clone, script, args, env, close_stderr):
    command = f'bash {script} "$@"' + (" 2>&-" if close_stderr else "")
    return subprocess.run(["bash", "-c", command, "bash", *args], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.mark.parametrize("close_stderr", [False, True])
def test_hw3_1_with_dash_paths_and_stderr_closed(clone, tiny_clip_file, close_stderr):
    (clone / "-imgs").mkdir()
    for i in range(3):
        noise_png(clone / "-imgs" / f"{i}.png", i)
    (clone / "-id2label.json").write_text(json.dumps({"0": "cat", "1": "dog"}))
    env = clean_env(HW3_P1_CLIP=tiny_clip_file, HW3_CACHE=str(clone / "cache"))
    result = run_script(clone, "hw3_1.sh", ["-imgs", "-id2label.json", "-out.csv"], env, close_stderr)
    assert result.returncode == 0, result.stderr + result.stdout
    with open(clone / "-out.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["filename", "label"] and sorted(r[0] for r in rows[1:]) == ["0.png", "1.png", "2.png"]


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory, tiny_vit_file, tiny_gpt2):
    from captioner import Captioner, make_config, mark_trainable, save_checkpoint

    model = Captioner(make_config("adapter", encoder=TINY_VIT, encoder_kwargs=TINY_VIT_KWARGS, adapter_dim=16),
                      tiny_gpt2[0], encoder_weights=tiny_vit_file)
    mark_trainable(model, verbose=False)
    path = tmp_path_factory.mktemp("scripts_ckpt") / "model.pt"
    save_checkpoint(model, str(path))
    return str(path)


@pytest.mark.parametrize("close_stderr", [False, True])
def test_hw3_2_with_dash_paths_and_stderr_closed(clone, untrained_checkpoint, tiny_vit_file, tiny_gpt2,
                                                  close_stderr):
    (clone / "-imgs").mkdir()
    for i in range(2):
        noise_png(clone / "-imgs" / f"{i}.png", i)
    os.symlink(tiny_gpt2[0], clone / "-w.bin")
    env = clean_env(HW3_P2_CKPT=untrained_checkpoint, HW3_P2_ENCODER_WEIGHTS=tiny_vit_file,
                    HW3_CACHE=str(clone / "cache"), HW3_P2_MAX_LEN="5")
    result = run_script(clone, "hw3_2.sh", ["-imgs", "-out.json", "-w.bin"], env, close_stderr)
    assert result.returncode == 0, result.stderr + result.stdout
    assert sorted(json.loads((clone / "-out.json").read_text(encoding="utf-8"))) == ["0", "1"]


# ---------------------------------------------------------------- offline: nothing cached fails at once

def test_hw3_1_without_cached_clip_fails_at_once_naming_the_download_script(clone):
    import time

    (clone / "imgs").mkdir()
    noise_png(clone / "imgs" / "0.png", 0)
    (clone / "id2label.json").write_text(json.dumps({"0": "cat", "1": "dog"}))
    env = clean_env(HW3_CACHE=str(clone / "empty_cache"))  # the default models, not in the cache
    start = time.perf_counter()
    result = run_script(clone, "hw3_1.sh", ["imgs", "id2label.json", "out.csv"], env, close_stderr=False)
    assert result.returncode == 1 and time.perf_counter() - start < 60
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: CLIP ViT-L/14 is not in "), result.stderr
    assert "bash hw3_download.sh" in lines[0] and not (clone / "out.csv").exists()
    assert not (clone / "empty_cache").exists()  # nothing fetched, nothing half-made


def test_hw3_2_without_a_cached_encoder_fails_at_once_naming_the_download_script(clone, untrained_checkpoint,
                                                                                tiny_gpt2, tmp_path):
    """A checkpoint that records no encoder file, nothing in the cache: the hub is not tried (HF_HUB_OFFLINE
    is set inside hw3_2.sh even when the caller's environment does not set it)."""
    import time

    import torch

    checkpoint = torch.load(untrained_checkpoint)
    checkpoint["config"]["encoder"].pop("weights_file", None)
    torch.save(checkpoint, tmp_path / "no_record.pt")
    (clone / "imgs").mkdir()
    noise_png(clone / "imgs" / "0.png", 0)
    env = clean_env(HW3_P2_CKPT=str(tmp_path / "no_record.pt"), HW3_CACHE=str(clone / "empty_cache"))
    start = time.perf_counter()
    result = run_script(clone, "hw3_2.sh", ["imgs", "out.json", tiny_gpt2[0]], env, close_stderr=False)
    assert result.returncode == 1 and time.perf_counter() - start < 60, result.stderr
    assert "hw3_download.sh" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (clone / "out.json").exists()
