"""The Makefile's graph, p2_select.py's choice of the submitted run, and the demo's report.

The graph is checked with `make -n` (what it would run) and on an empty data
folder (what it says); the demo report is read back only where `make demo`
built it (CI runs `make demo`, then this file with HW3_DEMO_REPORT=1).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_PDF = os.path.join(REPO, "demo", "hw3_report.pdf")
RUNS = ("none", "adapter", "prefix", "lora")

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def make(*args, cwd=REPO):
    return subprocess.run(["make", "--no-print-directory", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)


@needs_make
def test_dry_run_of_report_prints_the_real_data_commands(tmp_path):
    result = make("-n", "report", f"DATA={tmp_path}/hw3_data", f"OUT={tmp_path}/out", f"CKPT={tmp_path}/ck")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    data = f"{tmp_path}/hw3_data"
    expected = [
        f"bash hw3_1.sh {data}/p1_data/val {data}/p1_data/id2label.json {tmp_path}/out/p1_pred.csv",
        "p1_report.py accuracy", f"p1_report.py top5 --id2label {data}/p1_data/id2label.json --out-dir "
        f"{tmp_path}/out --pick-from {data}/p1_data/val",  # three classes, chosen in Python
        *[f"--peft {run} --out {tmp_path}/ck/{run}.pt" for run in RUNS],
        *[f"HW3_P2_CKPT={tmp_path}/ck/{run}.pt bash hw3_2.sh {data}/p2_data/images/val "
          f"{tmp_path}/out/p2_pred_{run}.json {data}/p2_data/decoder_model.bin" for run in RUNS],
        *[f"--metrics-out {tmp_path}/out/p2_metrics_{run}.json" for run in (*RUNS, "baseline")],
        "--epochs 0 --max-steps 0 --scst-epochs 0 --scst-max-steps 0",  # the language-model-only baseline
        f"p2_select.py --results {tmp_path}/out --runs none adapter prefix lora",
        f"p2_attention.py --images {data}/p3_data/images/bike.jpg",
        f"--per-image {tmp_path}/out/p2_per_image.json",
        f"build_report.py --results {tmp_path}/out",
    ]
    missing = [line for line in expected if line not in out]
    assert not missing, f"not in `make -n report`: {missing}\n{out}"
    # p2_select after every evaluation, the attention figures and the report after it
    assert out.index("p2_metrics_lora.json") < out.index("p2_select.py") < out.index("p2_attention.py") \
        < out.index("build_report.py")


@needs_make
def test_the_baseline_stays_untrained_whatever_train_args_say(tmp_path):
    """The language-model-only baseline shares TRAIN_ARGS with the runs: a --max-steps there (the demo's
    80) once made it train 80 steps, since --max-steps overrides --epochs. Its own options come last."""
    import shlex

    import p2_train

    out = make("-n", f"{tmp_path}/ck/baseline.pt", f"DATA={tmp_path}/hw3_data", f"CKPT={tmp_path}/ck",
               "TRAIN_ARGS=--max-steps 80 --epochs 3 --scst-epochs 2 --scst-max-steps 5").stdout
    words = shlex.split(out.replace("\\\n", " "))
    args = p2_train.parse_args(words[words.index("p2_train.py") + 1:])
    assert (args.max_steps, args.epochs, args.scst_epochs, args.scst_max_steps) == (0, 0, 0, 0), out
    assert p2_train.plan_steps(args, xe_batches=100, scst_batches=100) == (0, 0)


@needs_make
def test_dry_run_of_train_resumes_an_interrupted_run(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "adapter.pt.state").write_bytes(b"")
    out = make("-n", "train", f"DATA={tmp_path}/hw3_data", f"CKPT={ck}").stdout
    commands = {c.split("--peft ")[1].split()[0]: c for c in out.split("p2_train.py")[1:]}
    assert sorted(commands) == sorted(RUNS)
    assert "--resume" in commands["adapter"]
    assert not any("--resume" in commands[run] for run in ("none", "prefix", "lora"))


@needs_make
def test_report_without_data_says_make_data(tmp_path):
    result = make("report", f"DATA={tmp_path}/nothing", f"OUT={tmp_path}/out", f"CKPT={tmp_path}/ck")
    assert result.returncode != 0
    assert "run `make data` first" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "ck").exists()


def stub_python(tmp_path, log=None):
    """A PYTHON for make that runs nothing; with `log`, it appends its arguments and HW3_* environment."""
    stub = tmp_path / "python_stub"
    record = (f"import json, os, sys\nwith open({str(log)!r}, 'a') as f:\n"
              "    f.write(json.dumps([sys.argv[1:], {k: v for k, v in os.environ.items()\n"
              "                         if k.startswith(('HW3_', 'HF_HUB_'))}]) + '\\n')\n") if log else ""
    stub.write_text(f"#!{sys.executable}\n{record}")
    stub.chmod(0o755)
    return str(stub)


@needs_make
@pytest.mark.parametrize("args", [[], ["help"]])
def test_bare_make_and_make_help_list_targets_and_variables(args, tmp_path):
    result = make(*args, f"DATA={tmp_path}/data")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for target in ("data", "weights", "train", "report", "check", "demo", "test", "test-graders", "help"):
        assert f"  make {target} " in out, target
    for variable in ("DATA=", "OUT=", "CKPT=", "DEVICE=", "GPUS=", "DEMO_DIR=", "TRAIN_ARGS", "GRADERS_PYTHON="):
        assert variable in out, variable
    assert "HW3_*" in out  # the demo clears the user's settings, and says so
    assert "gdown" not in result.stdout.replace("with gdown", "") and not (tmp_path / "data").exists()


@needs_make
def test_make_test_graders_installs_the_graders_stack_and_runs_the_tests_in_it(tmp_path):
    venv = tmp_path / "venv"
    lines = make("-n", "test-graders", "GRADERS_PYTHON=/opt/python3.8", f"GRADERS_VENV={venv}").stdout.splitlines()
    assert any(line.startswith(f'"/opt/python3.8" -m venv --clear {venv}') for line in lines), lines
    install = [line for line in lines if " -m pip install " in line]
    assert len(install) == 1 and install[0].startswith(f"{venv}/bin/python ") and all(
        pin in install[0].split() for pin in ("torch==1.12.1", "torchvision==0.13.1", "requirements-dev.txt"))
    assert lines[-1] == f'PATH="{venv}/bin:$PATH" python3 -m pytest -q'
    with open(os.path.join(REPO, "requirements.txt"), encoding="utf-8") as f:
        assert "timm==0.9.10" in f.read().split()  # the third pin comes with the requirements


@needs_make
@pytest.mark.parametrize("python, words", [
    (sys.executable, f"GRADERS_PYTHON={sys.executable} is not Python 3.8"),
    ("", "no Python 3.8 found"),
])
def test_make_test_graders_refuses_a_python_that_is_not_3_8(tmp_path, python, words):
    if python and sys.version_info[:2] == (3, 8):
        pytest.skip("this Python is 3.8")
    venv = tmp_path / "venv"
    result = make("test-graders", f"GRADERS_PYTHON={python}", f"GRADERS_VENV={venv}")
    assert result.returncode != 0 and f"error: {words}" in result.stderr, result.stderr
    assert not venv.exists()


@needs_make
def test_vocabulary_is_not_downloaded_anywhere():
    """GPT-2's vocabulary is committed: no rule fetches it."""
    with open(os.path.join(REPO, "Makefile"), encoding="utf-8") as f:
        makefile = f.read()
    with open(os.path.join(REPO, "hw3_download.sh"), encoding="utf-8") as f:
        script = f.read()
    for text in (makefile, script):
        assert "encoder.json" not in text.replace("(encoder.json, vocab.bpe)", "") and "openaipublic" not in text
    assert make("-n", "weights").stdout.split() == ["python3", "hw3_cache.py", "clip", "python3", "hw3_cache.py",
                                                    "encoder"]


@needs_make
@pytest.mark.parametrize("gpus, expected", [
    ("", {run: None for run in RUNS + ("baseline",)}),
    ("3", {run: "3" for run in RUNS + ("baseline",)}),
    ("0,1", {"none": "0", "adapter": "1", "prefix": "0", "lora": "1", "baseline": "0"}),
    ("2,5,7", {"none": "2", "adapter": "5", "prefix": "7", "lora": "2", "baseline": "5"}),
])
def test_gpus_gives_each_training_run_one_gpu_round_robin(gpus, expected, tmp_path):
    ck = f"{tmp_path}/ck"
    out = make("-n", "train", f"{ck}/baseline.pt", f"DATA={tmp_path}/hw3_data", f"CKPT={ck}", f"GPUS={gpus}").stdout
    found = {}
    for line in out.splitlines():
        if "p2_train.py" in line:
            run = line.split("--peft ")[1].split()[0]
            run = "baseline" if "baseline.pt" in line else run
            prefix = line.split("python3 p2_train.py")[0].strip()
            found[run] = prefix.split("CUDA_VISIBLE_DEVICES=")[1] if prefix else None
    assert found == expected


@needs_make
def test_demo_ignores_the_users_hw3_settings(tmp_path):
    """Exported HW3_* settings (and command-line paths) do not reach the demo's commands: it sets its own."""
    log = tmp_path / "log.jsonl"
    demo_dir = tmp_path / "demo"
    env = dict(os.environ, HW3_P2_ENCODER_WEIGHTS="/elsewhere/vit_192.pth", HW3_P2_CKPT="/elsewhere/ck.pt",
               HW3_P1_CLIP="ViT-B/32", HW3_P2_BATCH="3", HW3_CACHE="/elsewhere/cache", HW3_BPE_DIR="/elsewhere",
               HW3_SOMETHING_NEW="1")
    result = subprocess.run(["make", "--no-print-directory", "DEMO=1", f"DEMO_DIR={demo_dir}", f"DATA={tmp_path}/x",
                             f"PYTHON={stub_python(tmp_path, log)}", f"{demo_dir}/hw3_data/demo.json"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    [(argv, seen)] = [json.loads(line) for line in log.read_text().splitlines()]
    assert argv == ["demo.py", str(demo_dir)]
    assert seen == {"HW3_CACHE": str(demo_dir / "cache"), "HW3_P1_CLIP": str(demo_dir / "models" / "tiny_clip.pt"),
                    "HF_HUB_OFFLINE": "1"}


@needs_make
def test_a_demo_that_rebuilds_nothing_says_up_to_date(tmp_path):
    """Every file of the demo's graph in place (as `make -t` would leave them): `make demo` rebuilds nothing and
    says so; a newer notes file rebuilds the report, and then it says "wrote"."""
    demo_dir = tmp_path / "demo"
    stub = stub_python(tmp_path)
    (demo_dir / "report_notes.md").parent.mkdir(parents=True)
    (demo_dir / "report_notes.md").write_text("notes")
    touches = make("-t", "-n", "DEMO=1", f"DEMO_DIR={demo_dir}", f"PYTHON={stub}", "report").stdout.splitlines()
    assert touches and all(line.startswith("touch ") for line in touches)
    for line in touches:
        path = line.split(" ", 1)[1]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8"):
            pass
    result = make("demo", f"DEMO_DIR={demo_dir}", f"PYTHON={stub}")
    assert result.returncode == 0, result.stderr
    assert f"demo: up to date ({demo_dir}/hw3_report.pdf)" in result.stdout and "wrote" not in result.stdout

    later = os.stat(demo_dir / "hw3_report.pdf").st_mtime + 10
    os.utime(demo_dir / "report_notes.md", (later, later))
    result = make("demo", f"DEMO_DIR={demo_dir}", f"PYTHON={stub}")
    assert result.returncode == 0, result.stderr
    assert "build_report.py" in result.stdout and f"demo: wrote {demo_dir}/hw3_report.pdf" in result.stdout


# ---------------------------------------------------------------- p2_select.py


def write_run(results, ckpts, run, cider, per_image=True):
    results.mkdir(exist_ok=True)
    ckpts.mkdir(exist_ok=True)
    ckpt = ckpts / f"{run}.pt"
    ckpt.write_bytes(f"checkpoint of {run}".encode())
    (results / f"p2_metrics_{run}.json").write_text(json.dumps({"cider": cider, "clipscore": 0.5, "n_images": 3}))
    (results / f"p2_ckpt_{run}.txt").write_text(f"{ckpt}\n")
    if per_image:
        (results / f"p2_per_image_{run}.json").write_text(json.dumps([{"key": run, "clip_score": 0.5}]))


def select(results, install, *extra):
    return subprocess.run([sys.executable, os.path.join(REPO, "p2_select.py"), "--results", str(results),
                           "--install", str(install), *extra], capture_output=True, text=True, timeout=60,
                          check=False)


def test_select_picks_the_highest_cider_and_records_it(tmp_path):
    results, ckpts = tmp_path / "out", tmp_path / "ck"
    for run, cider in zip(RUNS, (0.41, 0.93, 0.77, 0.95)):
        write_run(results, ckpts, run, cider)
    install = tmp_path / "cache" / "p2_checkpoint.pt"
    result = select(results, install)
    assert result.returncode == 0, result.stderr
    assert (results / "p2_ckpt_best.txt").read_text().strip() == str(ckpts / "lora.pt")
    assert install.read_bytes() == b"checkpoint of lora"
    assert json.loads((results / "p2_metrics_best.json").read_text()) == {
        "cider": 0.95, "clipscore": 0.5, "n_images": 3, "run": "lora"}
    assert json.loads((results / "p2_per_image.json").read_text()) == [{"key": "lora", "clip_score": 0.5}]
    assert "best run: lora" in result.stderr


def test_select_tie_goes_to_the_run_named_first(tmp_path):
    results, ckpts = tmp_path / "out", tmp_path / "ck"
    for run in RUNS:
        write_run(results, ckpts, run, 0.5)
    assert select(results, tmp_path / "p2.pt").returncode == 0
    assert (results / "p2_ckpt_best.txt").read_text().strip() == str(ckpts / "none.pt")


@pytest.mark.parametrize("damage, message", [
    ("missing_metrics", "does not exist"),
    ("not_json", "is not valid JSON"),
    ("cider_null", "'cider' is None, expected a finite number"),
    ("cider_nan", "'cider' is nan, expected a finite number"),
    ("cider_text", "'cider' is '0.9', expected a finite number"),
    ("missing_ckpt_txt", "checkpoint path"),
    ("ckpt_gone", "which is not a file"),
    ("missing_per_image", "per-image scores"),
])
def test_select_refuses_bad_input_and_records_nothing(tmp_path, damage, message):
    results, ckpts = tmp_path / "out", tmp_path / "ck"
    for run, cider in zip(RUNS, (0.41, 0.93, 0.77, 0.95)):
        write_run(results, ckpts, run, cider, per_image=damage != "missing_per_image")
    metrics = results / "p2_metrics_prefix.json"
    if damage == "missing_metrics":
        metrics.unlink()
    elif damage == "not_json":
        metrics.write_text("{cider: 1")
    elif damage.startswith("cider_"):
        value = {"cider_null": None, "cider_nan": float("nan"), "cider_text": "0.9"}[damage]
        metrics.write_text(json.dumps({"cider": value}))
    elif damage == "missing_ckpt_txt":
        (results / "p2_ckpt_prefix.txt").unlink()
    elif damage == "ckpt_gone":
        (ckpts / "prefix.pt").unlink()
    install = tmp_path / "p2.pt"
    result = select(results, install)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (results / "p2_ckpt_best.txt").exists() and not install.exists()


@pytest.mark.parametrize("install", ["ck/adapter.pt", "out/p2_metrics_adapter.json", "out/p2_ckpt_lora.txt",
                                     "out/p2_per_image_prefix.json", "out/p2_per_image.json", "out/p2_ckpt_best.txt",
                                     "symlink to ck/none.pt", "hard link to out/p2_metrics_lora.json",
                                     "out/../ck/./prefix.pt", "new/"])
def test_select_refuses_an_install_that_replaces_an_input_or_an_output_and_writes_nothing(tmp_path, install):
    results, ckpts = tmp_path / "out", tmp_path / "ck"
    for run, cider in zip(RUNS, (0.41, 0.93, 0.77, 0.95)):
        write_run(results, ckpts, run, cider)
    if install.startswith(("symlink", "hard link")):
        target = tmp_path / install.split(" to ")[1]
        link = tmp_path / "link.pt"
        link.symlink_to(target) if install.startswith("symlink") else os.link(target, link)
        install = "link.pt"
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    result = select(results, f"{tmp_path}/{install}")  # as typed: pathlib would drop the trailing "/"
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert ("writing it would replace that input" in result.stderr or "give each output its own path" in result.stderr
            or "is a folder; expected a file name" in result.stderr), result.stderr
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before


@pytest.mark.parametrize("install", ["ck/lora.pt", "ck/./lora.pt", "symlink", "hard link"])
def test_select_may_install_onto_the_chosen_checkpoint_itself(tmp_path, install):
    results, ckpts = tmp_path / "out", tmp_path / "ck"
    for run, cider in zip(RUNS, (0.41, 0.93, 0.77, 0.95)):
        write_run(results, ckpts, run, cider)
    if install in ("symlink", "hard link"):
        link = tmp_path / "link.pt"
        link.symlink_to(ckpts / "lora.pt") if install == "symlink" else os.link(ckpts / "lora.pt", link)
        install = "link.pt"
    result = select(results, tmp_path / install)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / install).read_bytes() == (ckpts / "lora.pt").read_bytes() == b"checkpoint of lora"
    assert (results / "p2_ckpt_best.txt").read_text().strip() == str(ckpts / "lora.pt")


def test_select_refuses_a_run_named_twice(tmp_path):
    results, ckpts = tmp_path / "out", tmp_path / "ck"
    write_run(results, ckpts, "lora", 0.9)
    result = select(results, tmp_path / "p2.pt", "--runs", "lora", "lora")
    assert result.returncode == 1 and "runs named twice" in result.stderr


# ---------------------------------------------------------------- demo.py's folder

@pytest.mark.parametrize("existing", ["hw3_data/p2_data/train.json", "report_notes.md", "the repository",
                                      "a link to a folder"])
def test_demo_refuses_a_folder_of_files_it_did_not_write_before_writing_anything(tmp_path, monkeypatch, existing):
    """The demo's files carry the course's names: a folder of real data (or the repository, whose
    report_notes.md is the demo's template) is refused, nothing in it replaced."""
    import demo

    monkeypatch.setattr(demo, "write_decoder", lambda *args: pytest.fail("the demo started writing"))
    folder = tmp_path / "mine"
    if existing == "the repository":
        folder = REPO
    elif existing == "a link to a folder":
        folder.mkdir()
        (folder / "data").symlink_to(tmp_path, target_is_directory=True)
    else:
        (folder / existing).parent.mkdir(parents=True, exist_ok=True)
        (folder / existing).write_text("the user's own\n")
    files = [Path(folder) / "report_notes.md"] if folder == REPO else [p for p in folder.rglob("*") if p.is_file()]
    before = {p: p.read_bytes() for p in files}
    with pytest.raises(SystemExit) as stop:
        demo.main([str(folder), "--train", "2", "--val", "1", "--p1-per-class", "1", "--lm-steps", "1"])
    assert str(stop.value).startswith(f"error: demo folder {str(folder)!r} holds files the demo did not write")
    assert {p: p.read_bytes() for p in files} == before
    assert not os.path.exists(os.path.join(folder, demo.MARKER))


def test_demo_writes_into_a_new_an_empty_or_its_own_folder(tmp_path, monkeypatch):
    import demo

    written = []
    def first_step(folder, *args):  # build stops at its first step: the folder was accepted
        written.append(folder)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "write_p1", first_step)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "earlier" / "hw3_data").mkdir(parents=True)
    (tmp_path / "earlier" / "hw3_data" / "demo.json").write_text("{}")
    for folder in ("new", "empty", "earlier", "new"):  # the second "new": the demo's marker is there now
        with pytest.raises(KeyboardInterrupt):
            demo.build(str(tmp_path / folder), 2, 1, 1, 32, 1, 64, 0)
        assert os.path.isfile(tmp_path / folder / demo.MARKER)
    assert len(written) == 4


def test_demo_writes_its_random_vit_into_its_own_cache_only(tmp_path, monkeypatch):
    """Run by hand, the demo must not leave a random ViT under a real model's name in the user's cache
    ($HW3_CACHE or the repository's cache/): it writes OUT_DIR/cache, where HW3_CACHE=OUT_DIR/cache finds it."""
    import demo
    import encoder

    users = tmp_path / "users_cache"
    monkeypatch.setenv("HW3_CACHE", str(users))
    repo_file = os.path.join(REPO, "cache", "timm", demo.DEMO_ENCODER + ".pth")
    repo_before = os.path.getmtime(repo_file) if os.path.exists(repo_file) else None
    written = demo.write_encoder(str(tmp_path / "out" / "cache"))
    assert not users.exists()
    assert (os.path.getmtime(repo_file) if os.path.exists(repo_file) else None) == repo_before
    monkeypatch.setenv("HW3_CACHE", str(tmp_path / "out" / "cache"))
    assert written == encoder.cached_weights_path(demo.DEMO_ENCODER) and os.path.isfile(written)


# ---------------------------------------------------------------- the demo's report


def demo_pdf():
    """demo/hw3_report.pdf; skips where `make demo` has not built it, fails where CI says it must be there."""
    if not os.path.isfile(DEMO_PDF):
        if os.environ.get("HW3_DEMO_REPORT") == "1":
            pytest.fail(f"HW3_DEMO_REPORT=1 but {DEMO_PDF} does not exist: `make demo` did not build it")
        pytest.skip("demo/hw3_report.pdf not built: run `make demo` (CI does, then sets HW3_DEMO_REPORT=1)")
    return DEMO_PDF


def pdf_pages(path) -> list:
    pdfium = pytest.importorskip("pypdfium2")
    doc = pdfium.PdfDocument(path)
    try:
        return [" ".join(page.get_textpage().get_text_range().split()) for page in doc]
    finally:
        doc.close()


def test_demo_report_is_complete():
    pages = pdf_pages(demo_pdf())
    text = " ".join(pages)
    assert "synthetic" in pages[0].lower(), "page 1 must say the numbers come from synthetic data"
    # the first page explains the phrase; no value may be it
    assert "not measured" not in text.replace("printed as 'not measured'", "")
    assert "MISSING" not in text, "the last page lists a result file as missing"
    assert "(to be written after the results are in)" not in text
    assert "Demo: the numbers and figures of this report come from synthetic" in text  # demo.py's notes
    results = os.path.join(REPO, "demo", "outputs")
    for run in (*RUNS, "best", "baseline"):
        metrics = json.load(open(os.path.join(results, f"p2_metrics_{run}.json"), encoding="utf-8"))
        assert f"{metrics['cider']:.4f}" in text, f"{run}'s CIDEr {metrics['cider']:.4f} is not in the report"


def test_demo_best_run_beats_the_language_model_only_captions():
    demo_pdf()
    results = os.path.join(REPO, "demo", "outputs")
    best = json.load(open(os.path.join(results, "p2_metrics_best.json"), encoding="utf-8"))
    baseline = json.load(open(os.path.join(results, "p2_metrics_baseline.json"), encoding="utf-8"))
    assert best["cider"] > baseline["cider"] + 0.2, (best, baseline)
    baseline_preds = json.load(open(os.path.join(results, "p2_pred_baseline.json"), encoding="utf-8"))
    assert len(set(baseline_preds.values())) == 1, "the language model alone writes one sentence for every image"


def test_demo_notebook_runs_headless_on_the_demo_outputs(tmp_path, monkeypatch):
    """p2_visualize.ipynb on what `make demo` left (CI runs this after it): the demo's data and checkpoint,
    its results copied so that the notebook's attention.json lands beside them, not in demo/outputs."""
    from test_p2_attention import check_notebook_outputs, run_notebook

    demo_pdf()
    out = tmp_path / "outputs"
    shutil.copytree(os.path.join(REPO, "demo", "outputs"), out)
    (out / "attention.json").unlink()
    keys = [row["key"] for row in json.loads((out / "p2_per_image.json").read_text(encoding="utf-8"))]
    env = {"HW3_DATA": os.path.join(REPO, "demo", "hw3_data"), "HW3_OUT": str(out),
           "HW3_CACHE": os.path.join(REPO, "demo", "cache"), "HW3_P2_CKPT": None, "HW3_P2_ENCODER_WEIGHTS": None}
    check_notebook_outputs(run_notebook(monkeypatch, env), out, keys)
