"""p2_train.py on bad data: unreadable images, a resume whose data changed, a decoder of another
vocabulary, captions that cannot be targets, a validation split that repeats the training one."""
import json
import os
import shutil
import signal
import subprocess
import sys
import types
from contextlib import contextmanager

import pytest
import torch
from conftest import REPO, small_copy, train_args
from test_p2_data import bomb_bytes

import p2_train
from decoder import load_gpt2_state

QUICK = ["--decode-beams", "1", "--decode-length-penalties", "0", "--scst-epochs", "0"]


def run(args):
    p2_train.main([str(a) for a in args])


def image_path(root, split: str, index: int) -> str:
    """The file of the split's index-th image in key order."""
    return os.path.join(root, "images", split, sorted(os.listdir(os.path.join(root, "images", split)))[index])


@pytest.fixture
def spoiled(tmp_path, captioning_setup):
    """40 training images, of which one is a truncated JPEG and one a decompression bomb (a PNG beyond
    Pillow's limit: image_io's ImageTooLarge, not an OSError); one validation image is not an image at all."""
    setup = small_copy(captioning_setup, tmp_path / "data")
    root = setup["data_root"]
    truncated, bomb, junk = image_path(root, "train", 5), image_path(root, "train", 17), image_path(root, "val", 2)
    with open(truncated, "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[:len(data) // 2])
    with open(bomb, "wb") as f:
        f.write(bomb_bytes())
    with open(junk, "wb") as f:
        f.write(b"\xff\xd8\xff" + b"\0" * 100)
    return dict(setup, truncated=truncated, bomb=bomb, junk=junk)


@pytest.mark.parametrize("workers, cache", [(0, False), (2, False), (0, True), (2, True)])
def test_unreadable_images_are_skipped_named_and_counted(tmp_path, spoiled, capsys, workers, cache):
    out = tmp_path / "m.pt"
    extra = ["--cache-features", tmp_path / "features"] if cache else []
    run(train_args(spoiled, out, "--max-steps", "2", "--workers", workers, *QUICK, *extra))
    err = capsys.readouterr().err
    assert f"skipping train image {spoiled['truncated']!r} (OSError" in err, err[-3000:]
    assert f"skipping train image {spoiled['bomb']!r} (ImageTooLarge: too large" in err
    assert f"skipping val image {spoiled['junk']!r} (UnidentifiedImageError" in err
    assert "skipped 2 unreadable train image(s) and their 10 caption(s)" in err
    assert "skipped 1 unreadable val image(s) and their 5 caption(s)" in err
    assert "Traceback" not in err
    assert torch.load(str(out) + ".state")["data"]["images"] == 38
    assert len(json.load(open(str(out) + ".val.json", encoding="utf-8"))) == 29


@pytest.mark.parametrize("workers, cache", [(0, False), (2, True)])
def test_strict_data_refuses_an_unreadable_image_before_training(tmp_path, spoiled, monkeypatch, workers, cache):
    monkeypatch.setattr(p2_train.Trainer, "run", lambda self: pytest.fail("training started"))
    out = tmp_path / "m.pt"
    extra = ["--cache-features", tmp_path / "features"] if cache else []
    with pytest.raises(SystemExit) as error:
        run(train_args(spoiled, out, "--strict-data", "--workers", workers, *QUICK, *extra))
    message = str(error.value)
    assert message.startswith("error: 2 of the 40 images in ") and "(--strict-data)" in message, message
    assert spoiled["truncated"] in message and spoiled["bomb"] in message and "Traceback" not in message
    assert not os.path.exists(str(out) + ".state")


def test_strict_data_is_in_the_help():
    result = subprocess.run([sys.executable, "p2_train.py", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120, check=True)
    assert "--strict-data" in result.stdout and "default: off" in " ".join(result.stdout.split())


# -- resume -------------------------------------------------------------------------------------


@contextmanager
def deadline(seconds: int):
    """Fail, rather than hang, when the block runs past `seconds` (a loop that cannot advance)."""
    def alarm(*_):
        raise AssertionError(f"still running after {seconds} s: the loop does not advance")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class Interrupted(Exception):
    pass


@pytest.fixture
def interrupted(tmp_path, captioning_setup, monkeypatch):
    """A run killed right after step 7 on 40 images (200 captions, 7 batches of 32), its last state at
    step 6 (cross-entropy, epoch 0, batch 6). -> (setup, out, common arguments)."""
    setup = small_copy(captioning_setup, tmp_path / "data")
    out = tmp_path / "run" / "m.pt"
    common = ["--epochs", "2", "--save-every", "6", "--log-every", "1", *QUICK]
    original = p2_train.Trainer.log

    def log(self, **record):
        original(self, **record)
        if self.progress["step"] == 7:
            raise Interrupted()

    with monkeypatch.context() as patch:
        patch.setattr(p2_train.Trainer, "log", log)
        with pytest.raises(Interrupted):
            run(train_args(setup, out, *common))
    progress = torch.load(str(out) + ".state")["progress"]
    assert (progress["phase"], progress["epoch"], progress["batch"]) == ("xe", 0, 6)
    return setup, out, common


def keep_captions(setup: dict, keep) -> None:
    path = os.path.join(setup["data_root"], "train.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    data["annotations"] = keep(data["annotations"])
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def test_resume_after_the_captions_were_halved_refuses_at_once(interrupted):
    """The issue's case: kill at step 6, remove half of train.json's captions, --resume: it used to say
    "resumed at step 6" and spin at 100% CPU (batch 6 lay past the new 4-batch epoch). Now: one error line."""
    setup, out, common = interrupted
    keep_captions(setup, lambda annotations: annotations[::2])
    result = subprocess.run([sys.executable, "p2_train.py", *map(str, train_args(setup, out, *common, "--resume"))],
                            cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --resume: the training data changed since the run started "
                           f"({os.path.join(setup['data_root'], 'train.json')} and its readable images: "
                           "now 100 captions of 40 images, then 200 of 40)"), last
    assert "Traceback" not in result.stderr and "resumed at" not in result.stderr


@pytest.mark.parametrize("damage", ["shape", "missing"])
def test_resume_with_weights_that_do_not_fit_is_one_error_line(interrupted, damage):
    """A state whose trainable tensors do not fit the model (edited, or another build's): one line naming
    the file and the first misfit, never load_state_dict's list of every mismatch."""
    setup, out, common = interrupted
    path = str(out) + ".state"
    state = torch.load(path)
    name = sorted(state["trainable"])[0]
    if damage == "shape":
        state["trainable"][name] = state["trainable"][name][..., :1]
    else:
        del state["trainable"][name]
    torch.save(state, path)
    with pytest.raises(SystemExit) as error:
        run(train_args(setup, out, *common, "--resume"))
    message = str(error.value)
    assert message.startswith(f"error: {path} ") and "\n" not in message, message
    assert (f"{name!r}: shape" if damage == "shape" else f"lacks 1 trainable tensor(s), e.g. [{name!r}]") in message


def test_resume_refuses_other_captions_of_the_same_count(interrupted):
    setup, out, common = interrupted

    def swap(annotations):
        annotations[0]["caption"], annotations[1]["caption"] = annotations[1]["caption"], annotations[0]["caption"]
        return annotations

    keep_captions(setup, swap)
    with deadline(120), pytest.raises(SystemExit, match="the same counts .200 captions of 40 images., but other "
                                                        "image keys"):
        run(train_args(setup, out, *common, "--resume"))


def test_a_state_without_a_fingerprint_still_refuses_a_position_past_the_data(interrupted):
    """A .state written before the fingerprint: the saved position itself is checked."""
    setup, out, common = interrupted
    state = torch.load(str(out) + ".state")
    del state["data"]
    torch.save(state, str(out) + ".state")
    keep_captions(setup, lambda annotations: annotations[::2])
    with deadline(120), pytest.raises(SystemExit, match="continues at xe epoch 0, batch 6, but .*train.json now "
                                                        "gives 4 batches per epoch"):
        run(train_args(setup, out, *common, "--resume"))


def test_an_epoch_with_no_batch_left_is_an_error_not_an_endless_loop():
    """train_epochs on a position past its data (which --resume now refuses): it must stop at once."""
    fake = types.SimpleNamespace(progress=dict(phase="xe", phase_step=6, epoch=0, batch=6, step=6),
                                 args=types.SimpleNamespace(seed=0), loader=lambda *a: [])
    with deadline(20), pytest.raises(RuntimeError, match="xe epoch 0 has no batch 6 .4 per epoch."):
        p2_train.Trainer.train_epochs(fake, list(range(100)), 32, 4, 20, step=None)


# -- the decoder's vocabulary, captions, the validation split ------------------------------------------


@pytest.mark.parametrize("rows", [50304, 1000])
def test_a_decoder_of_another_vocabulary_is_refused_at_load(tmp_path, captioning_setup, monkeypatch, rows):
    state = torch.load(captioning_setup["decoder_weights"])
    wte = state["wte.weight"]
    state["wte.weight"] = (torch.cat([wte, wte[:rows - len(wte)]]) if rows > len(wte) else wte[:rows]).clone()
    path = str(tmp_path / "decoder_model.bin")
    torch.save(state, path)
    expected = f"{path}: wte.weight has {rows} rows, expected GPT-2's 50257"
    with pytest.raises(ValueError, match="^" + expected.replace(".", r"\.")):
        load_gpt2_state(path)
    monkeypatch.setattr(p2_train, "prepare_images", lambda *a: pytest.fail("the images were read first"))
    out = tmp_path / "m.pt"
    with pytest.raises(SystemExit) as error:
        run(train_args(dict(captioning_setup, decoder_weights=path), out, *QUICK))
    assert str(error.value).startswith("error: " + expected)


@pytest.mark.parametrize("caption, start", [
    ("two dogs <|endoftext|> play", "{train_json}: the caption 'two dogs <|endoftext|> play'"),
    ("a cat \ud800 sits", "annotation file {train_json!r} holds a lone UTF-16 surrogate"),
])
def test_a_caption_that_cannot_be_a_target_is_one_error_line(tmp_path, captioning_setup, caption, start):
    setup = small_copy(captioning_setup, tmp_path / "data", n_train=10)
    keep_captions(setup, lambda annotations: annotations[:7] + [dict(annotations[7], caption=caption)]
                  + annotations[8:])
    result = subprocess.run([sys.executable, "p2_train.py", *map(str, train_args(setup, tmp_path / "m.pt"))],
                            cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: " + start.format(train_json=os.path.join(setup["data_root"], "train.json"))), last


def test_a_validation_split_equal_to_the_training_split_is_warned_about(tmp_path, captioning_setup, monkeypatch,
                                                                         capsys):
    setup = small_copy(captioning_setup, tmp_path / "data", n_train=10)
    root = tmp_path / "data"
    shutil.rmtree(root / "images" / "val")
    shutil.copytree(root / "images" / "train", root / "images" / "val")
    shutil.copy(root / "train.json", root / "val.json")
    monkeypatch.setattr(p2_train.Trainer, "run", lambda self: None)
    run(train_args(setup, tmp_path / "m.pt", *QUICK))
    err = capsys.readouterr().err
    assert (f"warning: 10 of the 10 validation images ({root / 'val.json'}, {root / 'images' / 'val'}) are also in "
            f"the training split ({root / 'train.json'}, {root / 'images' / 'train'})") in err, err[-2000:]
