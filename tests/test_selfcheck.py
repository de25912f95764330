"""selfcheck.py: this repository with tiny models passes, and each planted zero-point mistake
fails its own check with a message naming the file and the problem."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import captioner
import selfcheck

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"^(PASS|FAIL|WARN|SKIP) +([^:]+): (.*)$")


@pytest.fixture
def repo_copy(tmp_path):
    """The files git tracks in this repository, copied into a temporary folder (not a git repository)."""
    root = tmp_path / "repo"
    for rel in selfcheck.tracked_files(REPO):
        if os.path.isfile(os.path.join(REPO, rel)):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.join(REPO, rel), root / rel)
    return root


def edit(path, old, new):
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))


def failed(result, *words):
    assert result.status == "FAIL", result
    for word in words:
        assert word in result.message, (word, result.message)


# ---------------------------------------------------------------- the real repository, end to end

def test_repository_with_tiny_models_passes(tmp_path, tiny_clip_file, trained_checkpoint, captioning_setup):
    env = dict(os.environ, HW3_P1_CLIP=tiny_clip_file, HW3_P2_CKPT=trained_checkpoint,
               HW3_P2_ENCODER_WEIGHTS=captioning_setup["encoder_weights"], HW3_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "selfcheck.py", "--decoder-weights", captioning_setup["decoder_weights"],
                             "--samples", "6"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    lines = [LINE.match(line).groups() for line in result.stdout.splitlines() if LINE.match(line)]
    statuses = {name: status for status, name, _ in lines}
    messages = {name: message for _, name, message in lines}
    expected = {name: "PASS" for name in statuses}
    has_report = any(re.fullmatch(r"hw3_.+\.pdf", f) for f in os.listdir(REPO))
    if not has_report:
        expected["report PDF"] = "FAIL"
        assert messages["report PDF"] == "no hw3_<studentID>.pdf at the repository root"
    if 'P2_CKPT_URL=""' in open(os.path.join(REPO, "hw3_download.sh"), encoding="utf-8").read():
        expected["download URL"] = "FAIL"  # the student sets it once the checkpoint is uploaded
        assert "P2_CKPT_URL at the top of hw3_download.sh is empty" in messages["download URL"]
    if not torch.cuda.is_available():
        expected["P1 time"] = expected["P2 time"] = "SKIP"
        assert "no CUDA GPU here" in messages["P2 time"]
    assert statuses == expected, result.stdout + result.stderr[-3000:]
    assert set(statuses) == {"script rules", "absolute paths", "download URL", "report PDF", "tracked files", "P2 checkpoint",
                             "P2 model count", "P1 run", "P1 time", "P2 run", "P2 time", "Python 3.8"}
    saved = captioner.count_parameters(captioner.read_checkpoint(trained_checkpoint)["state_dict"])
    assert f"{saved:,d} saved parameters" in messages["P2 checkpoint"]
    assert f"{saved:,d} requires_grad parameters" in messages["P2 model count"]
    assert "on 6 images: output exact" in messages["P1 run"] and "on 6 images" in messages["P2 run"]
    assert result.returncode == (0 if has_report else 1)


def test_main_exit_status(repo_copy, trained_checkpoint, capsys):
    (repo_copy / "hw3_r12345678.pdf").write_bytes(b"%PDF-1.4\n")
    edit(repo_copy / "hw3_download.sh", 'P2_CKPT_URL=""', 'P2_CKPT_URL="1AbCdEf"')
    argv = ["--repo", str(repo_copy), "--checkpoint", trained_checkpoint, "--skip-run"]
    assert selfcheck.main(argv) == 0, capsys.readouterr().out
    edit(repo_copy / "hw3_2.sh", "python3 p2_inference.py", "rm -f \"$2\"\npython3 p2_inference.py")
    assert selfcheck.main(argv) == 1
    out = capsys.readouterr().out
    assert "FAIL  script rules: hw3_2.sh:4: `rm` is not allowed" in out
    assert "1 check(s) FAILED: script rules" in out


# ---------------------------------------------------------------- scripts and paths

@pytest.mark.parametrize("script, old, new, words", [
    ("hw3_2.sh", "python3 p2", "rm -f \"$2\"; python3 p2", ["hw3_2.sh:4", "`rm`"]),
    ("hw3_1.sh", "python3 p1", "python p1", ["hw3_1.sh:4", "`python3`, not `python`"]),
    ("hw3_2.sh", "python3 p2", "CUDA_VISIBLE_DEVICES=0 python3 p2", ["hw3_2.sh:4", "CUDA_VISIBLE_DEVICES"]),
    ("hw3_download.sh", 'P2_CKPT_URL=""', "P2_CKPT_URL=https://example.com/ckpt?id=1&export=download",
     ["hw3_download.sh:", "must be quoted"]),
    ("hw3_1.sh", '-- "$1"', '-- $1', ['hw3_1.sh does not pass "$1"']),
    ("hw3_2.sh", '"$3"', "cache/decoder_model.bin", ['hw3_2.sh does not pass "$3"']),
])
def test_script_violations(repo_copy, script, old, new, words):
    assert selfcheck.check_scripts(str(repo_copy)).status == "PASS"
    edit(repo_copy / script, old, new)
    failed(selfcheck.check_scripts(str(repo_copy)), *words)


def test_missing_script(repo_copy):
    (repo_copy / "hw3_1.sh").unlink()
    failed(selfcheck.check_scripts(str(repo_copy)), "hw3_1.sh is missing")


def test_absolute_path_in_grader_module(repo_copy):
    assert selfcheck.check_absolute_paths(str(repo_copy)).status == "PASS"
    with open(repo_copy / "p2_inference.py", "a") as f:
        f.write('\nDATA_ROOT = "/home/student/hw3_data"\n')
    failed(selfcheck.check_absolute_paths(str(repo_copy)), "p2_inference.py:", "'/home/student/hw3_data'")


def test_absolute_paths_only_in_code_strings(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('"""Module docs: /home/me/x."""\n# a comment: /data/x\n\n\nclass A:\n    """/mnt/x"""\n\n\n'
                    'def f(root):\n    """Reads /content/drive."""\n    return f"{root}/data/x", "/" + root\n\n\n'
                    'def g():\n    return ["C:\\\\hw3", "~/hw3", f"/root/{1}", "/dev/null"]\n')
    problems = selfcheck.absolute_paths(str(path))
    assert [p.split(": ", 1)[0] for p in problems] == ["m.py:15"] * 3, problems
    assert "'~/hw3'" in problems[1]


# ---------------------------------------------------------------- report and tracked files

def test_report_pdf_names(tmp_path):
    failed(selfcheck.check_report(str(tmp_path)), "no hw3_<studentID>.pdf")
    (tmp_path / "hw3_report.pdf").write_bytes(b"%PDF")
    result = selfcheck.check_report(str(tmp_path))
    assert result.status == "WARN" and "hw3_report.pdf" in result.message and "hw3_<studentID>.pdf" in result.message
    (tmp_path / "hw3_report.pdf").rename(tmp_path / "hw3_r12345678.pdf")
    assert selfcheck.check_report(str(tmp_path)) == ("PASS", "report PDF", "found hw3_r12345678.pdf")


def test_tracked_files(tmp_path):
    assert selfcheck.check_tracked_files(str(tmp_path)).status == "SKIP"  # not a git repository
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "hw3_data" / "p1_data").mkdir(parents=True)
    (tmp_path / "hw3_data" / "p1_data" / "0_450.png").write_bytes(b"x")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n")  # at the root, as in the course's template: fine
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "encoder.json").write_text("{}")
    (tmp_path / "decoder_model.bin").write_bytes(b"x")
    (tmp_path / "ok.py").write_text("x = 1\n")
    with open(tmp_path / "notes.txt", "wb") as f:
        f.truncate(selfcheck.MAX_FILE_BYTES + 1)
    subprocess.run(["git", "add", "."], cwd=tmp_path, check=True)
    assert selfcheck.check_tracked_files(str(tmp_path)).status == "FAIL"
    failed(selfcheck.check_tracked_files(str(tmp_path)), "hw3_data/p1_data/0_450.png: the dataset",
           "cache/encoder.json: a second copy", "decoder_model.bin: weights", "notes.txt: 50.0 MB")
    message = selfcheck.check_tracked_files(str(tmp_path)).message
    assert "ok.py" not in message and "\nvocab.bpe" not in message and not message.startswith("vocab.bpe")


# ---------------------------------------------------------------- the checkpoint

def test_checkpoint_over_the_limit(tmp_path, trained_checkpoint):
    config = captioner.read_checkpoint(trained_checkpoint)["config"]
    path = str(tmp_path / "big.pt")
    torch.save({"config": config, "state_dict": {"decoder.big": torch.zeros(captioner.MAX_TRAINABLE)}}, path)
    [result] = selfcheck.check_checkpoint(path, None)
    failed(result, "big.pt", "35,000,000 saved parameters (limit < 35,000,000)")


def test_bare_state_dict_checkpoint(tmp_path, trained_checkpoint):
    path = str(tmp_path / "bare.pt")
    torch.save(captioner.read_checkpoint(trained_checkpoint)["state_dict"], path)
    [result] = selfcheck.check_checkpoint(path, None)
    failed(result, "bare.pt", "not a captioner checkpoint", "{config, state_dict}")


def test_checkpoint_with_non_tensors_or_missing(tmp_path, trained_checkpoint):
    config = captioner.read_checkpoint(trained_checkpoint)["config"]
    path = str(tmp_path / "odd.pt")
    torch.save({"config": config, "state_dict": {"decoder.scale": 1.5}}, path)
    failed(selfcheck.check_checkpoint(path, None)[0], "not tensors", "decoder.scale")
    failed(selfcheck.check_checkpoint(str(tmp_path / "absent.pt"), None)[0], "absent.pt", "train", "hw3_download.sh")


def test_checkpoint_counts_without_decoder(trained_checkpoint):
    checked, model = selfcheck.check_checkpoint(trained_checkpoint, None)
    assert checked.status == "PASS" and model.status == "SKIP" and "--decoder-weights" in model.message


# ---------------------------------------------------------------- outputs and time

FAKE_HW3_2 = ('#!/bin/bash\npython3 -c "import json, os, sys; os.makedirs(os.path.dirname(sys.argv[2]), '
              'exist_ok=True); json.dump({\'wrong\': \'x\'}, open(sys.argv[2], \'w\'))" "$1" "$2" "$3"\n')


def test_wrong_json_keys_fail_the_run(repo_copy, tmp_path):
    (repo_copy / "hw3_2.sh").write_text(FAKE_HW3_2)
    assert selfcheck.check_scripts(str(repo_copy)).status == "PASS"  # the rules allow it; the output does not
    images = selfcheck.make_p2_samples(str(tmp_path / "p2"), 3)
    work = tmp_path / "work"
    work.mkdir()
    run, timing = selfcheck.check_run(str(repo_copy), "P2", images, lambda d, out: [d, out, "decoder_model.bin"],
                                      selfcheck.validate_json, str(work), timing=True)
    failed(run, "hw3_2.sh output keys differ", "'bike.v2'", "unexpected ['wrong']")
    assert timing.status == "SKIP"


def test_failing_script_fails_the_run(repo_copy, tmp_path):
    (repo_copy / "hw3_1.sh").write_text('#!/bin/bash\npython3 -c "raise SystemExit(\'broken\')" "$1" "$2" "$3"\n')
    images = str(tmp_path / "p1")
    selfcheck.make_p1_samples(images, 2)
    [run, _] = selfcheck.check_run(str(repo_copy), "P1", images, lambda d, out: [d, "id2label.json", out],
                                   lambda out, names: [], str(tmp_path), timing=False)
    failed(run, "exit status 1", "broken")


FAST_HW3_1 = ('#!/bin/bash\npython3 -c "import csv, os, sys; os.makedirs(os.path.dirname(sys.argv[3]), exist_ok=True); '
              'w = csv.writer(open(sys.argv[3], \'w\', newline=\'\')); w.writerow([\'filename\', \'label\']); '
              'w.writerows([n, 0] for n in os.listdir(sys.argv[1]))" "$1" "$2" "$3"\n')


def test_timing_runs_once_more_on_one_image(repo_copy, tmp_path):
    """The GPU path, on any machine: a second run on one image separates loading from the time per image."""
    (repo_copy / "hw3_1.sh").write_text(FAST_HW3_1)
    assert selfcheck.check_scripts(str(repo_copy)).status == "PASS"
    images = str(tmp_path / "p1")
    names = selfcheck.make_p1_samples(images, 4)
    run, timing = selfcheck.check_run(str(repo_copy), "P1", images, lambda d, out: [d, "id2label.json", out],
                                      lambda out, names: selfcheck.validate_csv(out, names, {"0": "apple"}),
                                      str(tmp_path), timing=True)
    assert run.status == "PASS" and "on 4 images: output exact" in run.message, run
    assert timing.status == "PASS" and "min for 2500 images" in timing.message, timing
    assert os.listdir(tmp_path / "P1_one") == [min(names)]


def test_validate_csv(tmp_path):
    path, names, id2label = tmp_path / "pred.csv", ["a b.v2.png", "c.png"], {"0": "apple", "1": "bear"}
    path.write_text("filename,label\na b.v2.png,1\nc.png,0\n")
    assert selfcheck.validate_csv(str(path), names, id2label) == []
    path.write_text("\ufefffilename,label\na b.v2.png,1\nc.png,0\n")
    assert "header" in selfcheck.validate_csv(str(path), names, id2label)[0]
    path.write_text("filename,label\na b.v2,1\nc.png,bear\n")
    problems = "\n".join(selfcheck.validate_csv(str(path), names, id2label))
    assert "missing ['a b.v2.png']" in problems and "['bear']" in problems


def test_validate_json(tmp_path):
    path, names = tmp_path / "pred.json", ["x.v2.jpg", "y.png"]
    path.write_text(json.dumps({"x.v2": "a dog", "y": "a cat"}))
    assert selfcheck.validate_json(str(path), names) == []
    path.write_text(json.dumps({"x": "a dog<|endoftext|>", "y": " "}))
    problems = "\n".join(selfcheck.validate_json(str(path), names))
    assert "missing ['x.v2']" in problems and "<|endoftext|>" in problems and "'y': ' '" in problems
    path.write_text(json.dumps(["a dog"]))
    assert "JSON list" in selfcheck.validate_json(str(path), names)[0]


def test_validate_json_flags_degenerate_captions(tmp_path):
    path, names = tmp_path / "pred.json", ["x.v2.jpg", "y.png", "z.png"]
    path.write_text(json.dumps({"x.v2": "!!!!!!!!", "y": "a cat .", "z": "... ?"}))
    assert selfcheck.validate_json(str(path), names) == [
        "captions without a letter or digit: {'x.v2': '!!!!!!!!', 'z': '... ?'}"]
    path.write_text(json.dumps({"x.v2": "a dog", "y": "a dog", "z": "a dog"}))
    assert selfcheck.validate_json(str(path), names) == [
        "all 3 captions are the same, 'a dog': the model ignores the image"]
    path.write_text(json.dumps({"x.v2": "a dog"}))
    assert selfcheck.validate_json(str(path), ["x.v2.jpg"]) == []  # one image: nothing to compare


def test_image_files_are_those_the_scripts_answer_for(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "good.jpg")
    whole = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[:len(whole) // 2])  # its header reads, its pixels do not
    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg"), "wb") as f:
        f.write(whole)
    assert selfcheck.image_files(str(tmp_path)) == ["good.jpg"]


@pytest.mark.parametrize("key, one, many, n, slowdown, status, minutes", [
    ("P1", 30.0, 31.0, 101, 1.0, "PASS", 0.9),  # 29.99 s load + 2500 x 0.01 s
    ("P1", 350.0, 351.0, 101, 1.0, "WARN", 6.2),  # over half of 10 min
    ("P1", 40.0, 50.0, 11, 1.0, "FAIL", 42.3),  # 1 s per image
    ("P2", 10.0, 11.0, 101, 18.0, "PASS", 7.2),  # an H100 time x 18: 180 s load + 1404 x 0.18 s
    ("P2", 20.0, 19.0, 50, 1.0, "PASS", 0.3),  # noise: the larger run was faster
])
def test_estimate(key, one, many, n, slowdown, status, minutes):
    result = selfcheck.estimate(key, one, many, n, slowdown)
    assert result.status == status and f"~{minutes:.1f} min" in result.message, result


def test_download_url_must_be_set(tmp_path):
    (tmp_path / "hw3_download.sh").write_text('#!/bin/bash\nP2_CKPT_URL=""  # set me\nwget -O x "$P2_CKPT_URL"\n')
    assert selfcheck.check_download(str(tmp_path)).status == "FAIL"
    (tmp_path / "hw3_download.sh").write_text('#!/bin/bash\nP2_CKPT_URL="1AbCdEf"\n')
    assert selfcheck.check_download(str(tmp_path)) == ("PASS", "download URL", "P2_CKPT_URL = 1AbCdEf")
    (tmp_path / "hw3_download.sh").unlink()
    assert "missing" in selfcheck.check_download(str(tmp_path)).message
