"""p2_train.py's options and run control: ranges checked when parsed, --max-steps, the decoding grid,
divergence, Ctrl-C, the run lock, outputs that would replace inputs, a full disk."""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, TINY_VIT, TINY_VIT_KWARGS, train_args

import p2_train
from captioner import Captioner, make_config, mark_trainable

QUICK = ["--decode-beams", "1", "--decode-length-penalties", "0"]


def run(args):
    p2_train.main([str(a) for a in args])


def read_log(out):
    with open(str(out) + ".log.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# -- ranges, at parse time ---------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--lr", "inf"], "argument --lr: expected a number > 0, got 'inf'"),
    (["--lr", "nan"], "argument --lr: expected a number > 0"),
    (["--lr", "0"], "argument --lr: expected a number > 0"),
    (["--lr=-1e-4"], "argument --lr: expected a number > 0"),
    (["--scst-lr", "-1"], "argument --scst-lr: expected a number > 0"),
    (["--scst-lr", "nan"], "argument --scst-lr: expected a number > 0"),
    (["--grad-clip", "-1"], "argument --grad-clip: expected a number > 0, or 0 / none for off"),
    (["--grad-clip", "nan"], "argument --grad-clip"),
    (["--grad-clip", "inf"], "argument --grad-clip"),
    (["--min-lr-ratio", "-1"], "argument --min-lr-ratio: expected a number in [0, 1]"),
    (["--min-lr-ratio", "5"], "argument --min-lr-ratio: expected a number in [0, 1]"),
    (["--warmup-fraction", "1.5"], "argument --warmup-fraction"),
    (["--weight-decay", "-1"], "argument --weight-decay: expected a number >= 0"),
    (["--weight-decay", "inf"], "argument --weight-decay"),
    (["--label-smoothing", "-0.5"], "argument --label-smoothing: expected a number in [0, 1)"),
    (["--label-smoothing", "1"], "argument --label-smoothing"),
    (["--label-smoothing", "2"], "argument --label-smoothing"),
    (["--workers", "-1"], "argument --workers: expected an integer in [0, 64]"),
    (["--workers", "4000"], "argument --workers: expected an integer in [0, 64], got '4000'"),
    (["--batch-size", "2.5"], "argument --batch-size: expected an integer >= 1"),
    (["--peft", "adapter", "--adapter-dim", "0"], "argument --adapter-dim: expected an integer >= 1"),
    (["--peft", "adapter", "--adapter-dim", "-4"], "argument --adapter-dim"),
    (["--peft", "prefix", "--prefix-len", "-3"], "argument --prefix-len"),
    (["--peft", "prefix", "--prefix-len", "0"], "argument --prefix-len"),
    (["--peft", "lora", "--lora-rank", "0"], "argument --lora-rank: expected an integer >= 1"),
    (["--peft", "lora", "--lora-alpha", "0"], "argument --lora-alpha"),
    (["--peft", "lora", "--lora-dropout", "1"], "argument --lora-dropout"),
    (["--peft", "none", "--lora-alpha", "8"], "--lora-alpha has no effect without the method it shapes"),
    (["--peft", "adapter", "--prefix-hidden", "8"], "--prefix-hidden has no effect"),
    (["--seed", "-1"], "argument --seed"),
    (["--max-steps", "-5"], "argument --max-steps"),
    (["--decode-length-penalties", "0", "nan"], "argument --decode-length-penalties"),
    (["--encoder-kwargs", "[1, 2]"], "argument --encoder-kwargs: expected a JSON object"),
    (["--encoder-kwargs", "{not json"], "argument --encoder-kwargs: expected a JSON object"),
    (["--encoder-kwargs", '{"img_size": "abc"}'], "argument --encoder-kwargs: 'img_size': 'abc'"),
    (["--encoder-kwargs", '{"num_classes": 5}'], "argument --encoder-kwargs: num_classes cannot be given"),
    (["--encoder-kwargs", '{"pretrained": true}'], "argument --encoder-kwargs: pretrained cannot be given"),
    (["--encoder-kwargs", '{"no_such_argument": 1}'], "'no_such_argument' not among the arguments"),
    (["--encoder-kwargs", '{"depth": -2}'], "'depth': -2 is not a finite number >= 0"),
])
def test_out_of_range_options_fail_when_parsed_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        p2_train.parse_args(["--print-params", "--encoder", TINY_VIT, *argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(("p2_train", "__main__", "pytest"))


def test_every_numeric_option_takes_its_type_from_the_table_and_shows_its_range():
    parser_help = subprocess.run([sys.executable, "p2_train.py", "--help"], cwd=REPO, capture_output=True, text=True,
                                 timeout=120, check=True).stdout
    flat = " ".join(parser_help.split())
    for name, allowed in p2_train.RANGES.items():
        assert f"--{name.replace('_', '-')}" in flat
        assert str(allowed) in flat, (name, str(allowed))
    assert "--max-steps N is the number of optimiser steps of the whole run" in flat


def test_the_encoder_s_refusal_of_a_value_is_one_error(tmp_path, tiny_gpt2, capsys):
    """A value the constructor's signature cannot judge (heads that do not divide the width)."""
    with pytest.raises(SystemExit) as stop:
        run(["--print-params", "--decoder-weights", tiny_gpt2[0], "--encoder", TINY_VIT, "--encoder-kwargs",
             json.dumps(dict(TINY_VIT_KWARGS, embed_dim=65))])
    assert "--encoder-kwargs" in str(stop.value) and "could not build" in str(stop.value)


@pytest.mark.parametrize("off", ["none", "0", "NONE"])
def test_grad_clip_off_really_is_off(off, tiny_gpt2, tiny_vit_file, monkeypatch):
    args = p2_train.parse_args(["--print-params", "--grad-clip", off])
    assert args.grad_clip is None
    model = Captioner(make_config("lora", encoder=TINY_VIT, encoder_kwargs=TINY_VIT_KWARGS, lora_rank=2),
                      tiny_gpt2[0], encoder_weights=tiny_vit_file)
    mark_trainable(model, verbose=False)
    args.cache_features = "(image tokens)"
    learner = p2_train.Learner(model, torch.device("cpu"), args)
    learner.use_optimizer(1e-3, 0.0)

    def clipped(*a, **k):
        raise AssertionError("clip_grad_norm_ called with clipping off")

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clipped)
    feats = torch.randn(2, 17, 64)
    inp = torch.randint(0, 50257, (2, 5))
    metrics = learner.xe_step(feats, inp, inp.clone(), lr=1e-3)
    assert metrics["grad_norm"] > 0 and torch.isfinite(torch.tensor(metrics["grad_norm"]))


# -- the run's length and the decoding grid -------------------------------------------------------

def test_the_decoding_grid_collapses_duplicate_settings():
    assert p2_train.decoding_settings([1], [0.0, 0.5, 1.0]) == [(1, 0.0)]
    assert p2_train.decoding_settings([1, 3, 3], [0.5, 0.0, 0.5]) == [(1, 0.0), (3, 0.0), (3, 0.5)]
    assert p2_train.decoding_settings([5, 1], [1.0]) == [(1, 1.0), (5, 1.0)]


def test_max_steps_is_the_whole_run_s_optimiser_steps(tmp_path, small_setup, capsys):
    """4 batches of 50 captions per epoch: --max-steps 12 with 2 SCST steps is 10 cross-entropy steps
    (2.5 epochs, more than --epochs 1 would give), then 2 SCST steps: 12 in all, and one greedy pass."""
    out = tmp_path / "m.pt"
    run(train_args(small_setup, out, "--batch-size", "50", "--epochs", "1", "--max-steps", "12", "--log-every", "1",
                   "--scst-max-steps", "2", "--scst-batch-size", "10", "--scst-samples", "2",
                   "--decode-beams", "1", "--decode-length-penalties", "0", "0.5", "1"))
    err = capsys.readouterr().err
    assert "plan: 10 cross-entropy steps" in err and "then 2 SCST steps" in err
    assert "12 optimiser steps in all; --max-steps 12 ends the run; --epochs 1 is ignored" in err
    log = read_log(out)
    steps = [(r["phase"], r["step"]) for r in log if "loss" in r]
    assert steps == [("xe", s) for s in range(1, 11)] + [("scst", 11), ("scst", 12)]
    assert torch.load(str(out) + ".state")["progress"]["step"] == 12
    grid = [r for r in log if "decoding_grid" in r][0]["decoding_grid"]
    assert [(r["beam_size"], r["length_penalty"]) for r in grid] == [(1, 0.0)]


def test_max_steps_that_leave_no_cross_entropy_step_are_refused(tmp_path, small_setup):
    out = tmp_path / "m.pt"
    with pytest.raises(SystemExit, match="--max-steps 3 counts every optimiser step.*SCST phase alone takes 4"):
        run(train_args(small_setup, out, "--max-steps", "3", "--scst-batch-size", "10", *QUICK))


# -- divergence ----------------------------------------------------------------------------------

def test_a_diverging_run_is_an_error_and_keeps_its_last_good_state(tmp_path, small_setup, capsys):
    out = tmp_path / "m.pt"
    with pytest.raises(SystemExit) as stop:
        run(train_args(small_setup, out, "--lr", "1e30", "--warmup-steps", "0", "--max-steps", "8",
                       "--scst-epochs", "0", "--save-every", "1", "--log-every", "1", *QUICK))
    message = str(stop.value)
    assert message.startswith("error: training diverged at step ") and stop.value.code != 0
    assert "loss nan" in message or "loss inf" in message, message
    assert re.search(r"learning rate [0-9.]+e\+(29|30)\b", message) and "--resume" in message, message
    state = torch.load(str(out) + ".state")
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())
    assert state["progress"]["step"] < 8 and state["progress"]["phase"] == "xe"
    assert any("diverged" in r.get("error", "") for r in read_log(out))
    # the checkpoint holds the best validated weights: the untrained model of step 0, the only validation
    assert [r["step"] for r in read_log(out) if "saved" in r] == [0]


def test_a_run_whose_best_is_the_untrained_model_says_so(tmp_path, small_setup, monkeypatch, capsys):
    monkeypatch.setattr(p2_train.Trainer, "cider", lambda self, preds: 1.0 / (1 + self.progress["step"]))
    out = tmp_path / "m.pt"
    run(train_args(small_setup, out, "--max-steps", "2", "--scst-epochs", "0", "--val-every", "1", *QUICK))
    assert "holds the UNTRAINED model" in capsys.readouterr().err
    assert any("UNTRAINED" in r.get("warning", "") for r in read_log(out))


# -- stopping, the lock, outputs, a full disk -------------------------------------------------------

def test_ctrl_c_stops_without_a_traceback_and_says_how_to_resume(tmp_path, small_setup):
    out = tmp_path / "m.pt"
    args = train_args(small_setup, out, "--max-steps", "100000", "--scst-epochs", "0", "--save-every", "1", *QUICK)
    process = subprocess.Popen([sys.executable, "p2_train.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not os.path.exists(str(out) + ".state") and process.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(2)  # a few steps in
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "interrupted at step " in err and f"kept in {out}.state" in err
    after = err[err.index("continue with:"):].splitlines()[1].strip()
    assert after.startswith("python3 ") and after.endswith("--resume") and str(out) in after
    assert not os.path.exists(str(out) + ".lock")


def test_the_run_lock(tmp_path):
    out = str(tmp_path / "m.pt")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "m.pt.lock").write_text(f"{sleeper.pid}\n")
        with pytest.raises(p2_train.InputError, match=f"process {sleeper.pid}"):
            p2_train.RunLock(out).__enter__()
    finally:
        sleeper.kill()
        sleeper.wait()
    for stale in (f"{sleeper.pid}\n", "", "garbage\x00\xff", "-3", "99999999999999999999"):  # its run ended / damaged
        (tmp_path / "m.pt.lock").write_text(stale, errors="surrogateescape")
        with p2_train.RunLock(out):
            assert (tmp_path / "m.pt.lock").read_text() == f"{os.getpid()}\n"
        assert not (tmp_path / "m.pt.lock").exists()


def test_a_second_run_on_the_same_out_is_refused_before_any_work(tmp_path, small_setup, monkeypatch):
    out = tmp_path / "m.pt"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    def built(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(p2_train, "Captioner", built)
    try:
        (tmp_path / "m.pt.lock").write_text(str(sleeper.pid))
        with pytest.raises(SystemExit, match=f"another p2_train.py run \\(process {sleeper.pid}\\) is writing"):
            run(train_args(small_setup, out, *QUICK))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert (tmp_path / "m.pt.lock").read_text() == str(sleeper.pid)  # not ours to remove


@pytest.mark.parametrize("how", ["same path", "symlink", "state beside out"])
def test_outputs_never_replace_inputs(tmp_path, small_setup, monkeypatch, how):
    weights = tmp_path / "decoder_model.bin"
    shutil.copy(small_setup["decoder_weights"], weights)
    before = weights.read_bytes()
    if how == "same path":
        out = weights
    elif how == "symlink":
        out = tmp_path / "link.pt"
        out.symlink_to(weights)
    else:
        out = tmp_path / "decoder_model"
        weights = weights.rename(tmp_path / "decoder_model.state")

    def built(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(p2_train, "Captioner", built)
    with pytest.raises(SystemExit, match="writing it would replace that input"):
        run(train_args(dict(small_setup, decoder_weights=str(weights)), out, *QUICK))
    assert weights.read_bytes() == before


@pytest.mark.parametrize("name", ["m" * 247 + ".pt", "é" * 123 + ".pt", "m" * 250 + ".pt"],
                         ids=["ascii250", "utf8x2", "lock-too"])
def test_an_out_whose_side_files_exceed_name_max_fails_before_any_work(tmp_path, small_setup, monkeypatch, name):
    """--out's own name is legal, OUT.state / OUT.log.jsonl / OUT.val.json / OUT.lock are not: refused
    before the model is built, never by a traceback after the training."""
    def built(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(p2_train, "Captioner", built)
    with pytest.raises(SystemExit, match=r"^error: --out's .*bytes long; the file system takes at most 255 "
                                         r"\(the files beside --out add up to 10 bytes to its name\)$"):
        run(train_args(small_setup, tmp_path / name, *QUICK))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("victim", ["encoder.json", "vocab.bpe", "cached encoder weights"])
def test_out_never_replaces_the_vocabulary_or_the_cached_encoder_it_reads(tmp_path, small_setup, monkeypatch, victim):
    """Inputs that no option names: GPT-2's vocabulary (the repository's, or $HW3_BPE_DIR's) and the
    encoder's weights in the cache when --encoder-weights is not given."""
    vocabulary = tmp_path / "gpt2"
    vocabulary.mkdir()
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(os.path.join(REPO, name), vocabulary / name)
    monkeypatch.setenv("HW3_BPE_DIR", str(vocabulary))
    monkeypatch.setenv("HW3_CACHE", str(tmp_path / "cache"))
    setup = dict(small_setup)
    if victim == "cached encoder weights":
        path = tmp_path / "cache" / "timm" / f"{TINY_VIT}.pth"
        path.parent.mkdir(parents=True)
        shutil.copy(small_setup["encoder_weights"], path)
        setup["encoder_args"] = ["--encoder", TINY_VIT, "--encoder-kwargs", json.dumps(TINY_VIT_KWARGS)]
    else:
        path = vocabulary / victim
    before = path.read_bytes()

    def built(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(p2_train, "Captioner", built)
    with pytest.raises(SystemExit, match="writing it would replace that input"):
        run(train_args(setup, path.parent / "." / path.name, *QUICK))
    assert path.read_bytes() == before


@pytest.mark.parametrize("failure", ["ENOSPC", "torch's zip writer"])
def test_a_full_disk_while_saving_is_one_error_and_keeps_the_last_state(tmp_path, small_setup, monkeypatch, failure):
    out = tmp_path / "m.pt"
    real_save, calls = p2_train.atomic_torch_save, []

    def save(obj, path):
        calls.append(path)
        if len(calls) < 3:
            return real_save(obj, path)
        if failure == "ENOSPC":
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(10 ** 9, 10 ** 9, 1000))
        raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0")

    monkeypatch.setattr(p2_train, "atomic_torch_save", save)
    with pytest.raises(SystemExit) as stop:
        run(train_args(small_setup, out, "--max-steps", "6", "--scst-epochs", "0", "--save-every", "1", *QUICK))
    message = str(stop.value)
    assert message.startswith("error: no space left on ") and f"writing {out}.state (" in message, message
    assert " MB needed" in message and f"its state at step 1 is kept in {out}.state" in message
    assert torch.load(str(out) + ".state")["progress"]["step"] == 1
    assert not os.path.exists(str(out) + ".lock")
