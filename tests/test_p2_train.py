"""p2_train.py through its command line: it learns, it resumes exactly, SCST runs, bad input fails early."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_VIT, TINY_VIT_KWARGS, train_args

import p2_train
from captioner import Captioner, load_checkpoint, make_config, mark_trainable, trainable_state
from cider import CiderD, tokenize
from p2_evaluate import load_references


def read_log(checkpoint):
    with open(checkpoint + ".log.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_a_tiny_model_learns_the_synthetic_set(trained_checkpoint, captioning_setup):
    log = read_log(trained_checkpoint)
    cider = [r["val_cider"] for r in log if "val_cider" in r]
    losses = [r["loss"] for r in log if "loss" in r]
    assert log[0]["step"] == 0 and "val_cider" in log[0]  # validated before training
    # at step 0 the new modules are the identity: the language model alone, one caption for every
    # image, already sharing n-grams with the references; training must ground it in the image
    assert max(cider) > cider[0] + 0.25, cider
    assert sum(losses[-3:]) < sum(losses[:3]), losses  # the language model's loss was low already

    # the kept checkpoint is the best one, and its captions score what the log says
    with open(trained_checkpoint + ".val.json", encoding="utf-8") as f:
        preds = json.load(f)
    refs = load_references(os.path.join(captioning_setup["data_root"], "val.json"))
    score, _ = CiderD().compute_score({k: [tokenize(r) for r in v] for k, v in refs.items()},
                                      {k: tokenize(c) for k, c in preds.items()})
    assert score == pytest.approx(max(cider))
    model = load_checkpoint(trained_checkpoint, captioning_setup["decoder_weights"],
                            encoder_weights=captioning_setup["encoder_weights"])
    assert len(set(preds.values())) > len(preds) / 3  # captions differ by image
    shapes = ("circle", "square", "triangle", "star", "cross")
    assert sum(any(s in c for s in shapes) for c in preds.values()) >= 0.9 * len(preds)
    assert model.config["generation"]["max_len"] == 16


def test_checkpoint_holds_exactly_the_trainable_tensors(trained_checkpoint, captioning_setup):
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    assert set(checkpoint) == {"config", "state_dict"}
    model = Captioner(checkpoint["config"], captioning_setup["decoder_weights"],
                      encoder_weights=captioning_setup["encoder_weights"])
    mark_trainable(model, verbose=False)
    assert set(checkpoint["state_dict"]) == set(trainable_state(model))
    assert all(not k.startswith("encoder.") for k in checkpoint["state_dict"])


def test_print_params(tiny_gpt2, tiny_vit_file):
    args = ["--print-params", "--peft", "lora", "--lora-rank", "4", "--lora-alpha", "8",
            "--decoder-weights", tiny_gpt2[0], "--encoder", TINY_VIT, "--encoder-weights", tiny_vit_file,
            "--encoder-kwargs", json.dumps(TINY_VIT_KWARGS)]
    result = subprocess.run([sys.executable, "p2_train.py", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=300, check=True)
    model = Captioner(make_config("lora", encoder=TINY_VIT, encoder_kwargs=TINY_VIT_KWARGS, lora_rank=4,
                                  lora_alpha=8.0), tiny_gpt2[0], encoder_weights=tiny_vit_file)
    expected = sum(mark_trainable(model, verbose=False).values())
    assert result.stdout.strip().splitlines()[-1] == f"trainable parameters: {expected}"
    assert "lora" in result.stderr and "cross_attention" in result.stderr


def run(args):
    p2_train.main([str(a) for a in args])


def test_resume_equals_an_uninterrupted_run(tmp_path, captioning_setup):
    """Interrupted mid-epoch, resumed across an epoch boundary: the same tensors, bit for bit."""
    common = ["--epochs", "2", "--scst-epochs", "0", "--save-every", "1000"]
    whole = tmp_path / "whole" / "model.pt"
    run(train_args(captioning_setup, whole, *common, "--max-steps", "36"))
    split = tmp_path / "split" / "model.pt"
    run(train_args(captioning_setup, split, *common, "--max-steps", "5"))
    assert torch.load(str(split) + ".state")["progress"]["step"] == 5
    run(train_args(captioning_setup, split, *common, "--max-steps", "36", "--resume"))

    a, b = torch.load(str(whole) + ".state"), torch.load(str(split) + ".state")
    assert a["progress"] == b["progress"] and a["progress"]["epoch"] == 1  # crossed the epoch boundary
    assert a["trainable"].keys() == b["trainable"].keys()
    for name in a["trainable"]:
        assert torch.equal(a["trainable"][name], b["trainable"][name]), name
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def test_scst_runs_end_to_end(tmp_path, captioning_setup, trained_checkpoint):
    out = tmp_path / "scst.pt"
    run(train_args(captioning_setup, out, "--peft", "adapter", "--adapter-dim", "32", "--epochs", "1",
                   "--scst-epochs", "1", "--scst-batch-size", "8", "--scst-samples", "3", "--max-steps", "40",
                   "--log-every", "1"))
    log = read_log(str(out))
    scst = [r for r in log if r["phase"] == "scst" and "reward" in r]
    assert len(scst) == 8  # steps 33..40
    assert all(0.0 <= r["reward"] and r["lr"] == pytest.approx(1e-5) for r in scst)
    assert any(r["baseline"] > 0 for r in scst)  # greedy captions of a model that has learned something
    assert torch.load(str(out) + ".state")["progress"]["phase"] == "scst"
    assert os.path.isfile(out)


@pytest.fixture
def broken_data(tmp_path, captioning_setup):
    root = tmp_path / "data"
    shutil.copytree(captioning_setup["data_root"], root)
    return root


def expect_error(args, message, out):
    with pytest.raises(SystemExit) as error:
        run(args)
    assert message in str(error.value)
    assert not os.path.exists(str(out) + ".state") and not os.path.exists(out)


def test_missing_data_root(tmp_path, captioning_setup):
    out = tmp_path / "m.pt"
    setup = dict(captioning_setup, data_root=str(tmp_path / "nowhere"))
    expect_error(train_args(setup, out), "does not exist", out)


def test_caption_file_of_the_wrong_structure(tmp_path, captioning_setup, broken_data):
    (broken_data / "val.json").write_text(json.dumps({"images": [{"file_name": "x.jpg", "id": 1}]}))
    out = tmp_path / "m.pt"
    expect_error(train_args(dict(captioning_setup, data_root=str(broken_data)), out),
                 "missing the 'annotations' list", out)


def test_image_listed_but_absent(tmp_path, captioning_setup, broken_data):
    victim = sorted(os.listdir(broken_data / "images" / "train"))[3]
    os.remove(broken_data / "images" / "train" / victim)
    out = tmp_path / "m.pt"
    expect_error(train_args(dict(captioning_setup, data_root=str(broken_data)), out),
                 victim.rsplit(".", 1)[0], out)


def test_decoder_file_of_the_wrong_layout(tmp_path, captioning_setup):
    state = torch.load(captioning_setup["decoder_weights"])
    torch.save({"transformer." + k: v for k, v in state.items()}, tmp_path / "hf_layout.bin")
    out = tmp_path / "m.pt"
    expect_error(train_args(dict(captioning_setup, decoder_weights=str(tmp_path / "hf_layout.bin")), out),
                 "decoder_model.bin layout", out)


def test_resume_needs_a_state_and_a_state_needs_resume(tmp_path, captioning_setup):
    out = tmp_path / "m.pt"
    expect_error(train_args(captioning_setup, out, "--resume"), "no training state", out)
    run(train_args(captioning_setup, out, "--epochs", "1", "--scst-epochs", "0", "--max-steps", "2"))
    with pytest.raises(SystemExit, match="exists: continue that run with --resume"):
        run(train_args(captioning_setup, out, "--epochs", "1", "--max-steps", "2"))
    with pytest.raises(SystemExit, match="other model settings"):
        run(train_args(captioning_setup, out, "--epochs", "1", "--max-steps", "3", "--resume", "--peft", "lora"))
