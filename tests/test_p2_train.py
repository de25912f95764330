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
from file_io import load_references
from weights import torch_load


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
    checkpoint = torch_load(trained_checkpoint)
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


QUICK = ["--decode-beams", "1", "--decode-length-penalties", "0"]


class Interrupted(Exception):
    pass


def interrupt_at(monkeypatch, step):
    """Make the run die (as a killed process would) right after global step `step`."""
    original = p2_train.Trainer.log

    def log(self, **record):
        original(self, **record)
        if self.progress["step"] == step:
            raise Interrupted(step)

    monkeypatch.setattr(p2_train.Trainer, "log", log)


def assert_same_state(path_a, path_b):
    a, b = torch.load(path_a), torch.load(path_b)
    assert a["progress"] == b["progress"]
    for name in a["trainable"]:
        assert torch.equal(a["trainable"][name], b["trainable"][name]), name
        assert torch.equal(a["best"][name], b["best"][name]), name
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    return a


@pytest.mark.parametrize("phase, stop", [("xe", 9), ("scst", 20)])
def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path, small_setup, monkeypatch, phase, stop):
    """Killed mid-phase, resumed from the last saved state: the same tensors bit for bit, and each
    step logged once. 7 batches per epoch; the cross-entropy phase is 14 steps, SCST 8."""
    common = ["--epochs", "2", "--save-every", "4", "--log-every", "1", "--val-every", "6", "--scst-epochs", "2",
              "--scst-batch-size", "10", "--scst-samples", "2", "--scst-lr", "1e-3", *QUICK]
    whole = tmp_path / "whole" / "model.pt"
    run(train_args(small_setup, whole, *common))
    split = tmp_path / "split" / "model.pt"
    with monkeypatch.context() as patch:
        interrupt_at(patch, stop)
        with pytest.raises(Interrupted):
            run(train_args(small_setup, split, *common))
    assert torch.load(str(split) + ".state")["progress"]["phase"] == phase
    run(train_args(small_setup, split, *common, "--resume", "--log-every", "2"))

    state = assert_same_state(str(whole) + ".state", str(split) + ".state")
    assert state["progress"]["phase"] == "done" and state["progress"]["step"] == 22
    steps = [(r["step"], r["phase"], "val_cider" in r) for r in read_log(str(split)) if "decoding_grid" not in r]
    assert len(steps) == len(set(steps))  # nothing the interrupted run logged after its last state appears twice
    # every number the resumed run logged (losses, rewards, validation CIDEr, the decoding grid) is the
    # uninterrupted run's, to the last bit (it logged every step; the resumed run every other one after resuming)
    untimed = lambda records: [json.dumps({k: v for k, v in r.items() if k != "time"}, sort_keys=True)  # noqa: E731
                               for r in records]
    whole_log = set(untimed(read_log(str(whole))))
    split_log = read_log(str(split))
    assert all(r in whole_log for r in untimed(split_log))
    assert any("reward" in r for r in split_log) and any("decoding_grid" in r for r in split_log)
    assert torch.equal(torch.load(whole)["state_dict"]["decoder.visual_proj.weight"],
                       torch.load(split)["state_dict"]["decoder.visual_proj.weight"])


def test_resume_refuses_settings_that_change_the_run(tmp_path, captioning_setup, broken_data):
    out = tmp_path / "m.pt"
    run(train_args(captioning_setup, out, "--epochs", "1", "--scst-epochs", "0", "--max-steps", "2", *QUICK))
    other_data = dict(captioning_setup, data_root=str(broken_data))
    for args, option in [(train_args(captioning_setup, out, "--batch-size", "16"), "--batch-size"),
                         (train_args(captioning_setup, out, "--weight-decay", "0.5"), "--weight-decay"),
                         (train_args(other_data, out), "--data-root")]:
        with pytest.raises(SystemExit, match=option):
            run(args + ["--epochs", "1", "--scst-epochs", "0", "--max-steps", "2", "--resume", *QUICK])
    # logging, validation and the decoding grid may change: the finished run just ends
    run(train_args(captioning_setup, out, "--epochs", "1", "--scst-epochs", "0", "--max-steps", "2", "--resume",
                   "--log-every", "1", "--val-every", "1", "--decode-beams", "2"))


def test_the_schedule_follows_the_run():
    args = p2_train.parse_args(["--print-params", "--lr", "1.0", "--min-lr-ratio", "0.1"])
    # a short run: a tenth of it warms up, the decay ends exactly at its last step
    assert p2_train.warmup_steps(30, args) == 3
    lrs = [p2_train.learning_rate(s, 30, args) for s in range(30)]
    assert lrs[2] == pytest.approx(1.0) and lrs[29] == pytest.approx(0.1) and lrs[15] > 0.5
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    # the full data's defaults (5 epochs of 829 steps) warm up for 414 steps; a long run stops at 500
    assert p2_train.warmup_steps(5 * 829, args) == 414 and p2_train.warmup_steps(20 * 829, args) == 500
    assert p2_train.phase_steps(5, 829, 0) == 4145 and p2_train.phase_steps(5, 829, 300) == 300
    assert p2_train.schedule_warnings(4145, 829, args) == []
    short = p2_train.parse_args(["--print-params", "--max-steps", "100"])
    assert "--val-every" in p2_train.schedule_warnings(100, 829, short)[0]
    late = p2_train.parse_args(["--print-params", "--warmup-fraction", "0.8", "--val-every", "10"])
    assert "warm-up takes 80 of the phase's 100 steps" in p2_train.schedule_warnings(100, 829, late)[0]


def test_a_short_run_warns_and_learns_on_its_schedule(tmp_path, captioning_setup, capsys):
    out = tmp_path / "short.pt"
    run(train_args(captioning_setup, out, "--epochs", "5", "--max-steps", "4", "--warmup-steps", "500",
                   "--scst-epochs", "0", "--log-every", "1", *QUICK))
    assert "--val-every is 0" in capsys.readouterr().err
    lrs = [r["lr"] for r in read_log(str(out)) if "lr" in r]
    assert lrs == pytest.approx([3e-3, 3e-3 * (0.05 + 0.95 * 0.75), 3e-3 * (0.05 + 0.95 * 0.25), 3e-3 * 0.05])


@pytest.mark.parametrize("peft, overrides", [("adapter", dict(adapter_dim=8)),
                                             ("prefix", dict(prefix_len=4, prefix_hidden=16)),
                                             ("prefix", dict(prefix_len=4, prefix_hidden=0)),
                                             ("lora", dict(lora_rank=4))])
def test_weight_decay_falls_on_the_linear_maps_weights_only(tiny_gpt2, tiny_vit_file, peft, overrides):
    """make_optimizer's rule, as its docstring states it: the weight matrices of linear maps (LoRA's
    A and B included) decay; biases, LayerNorms and the prefix's embedding or key/value tensor do not."""
    model = Captioner(make_config(peft, encoder=TINY_VIT, encoder_kwargs=TINY_VIT_KWARGS, **overrides),
                      tiny_gpt2[0], encoder_weights=tiny_vit_file)
    mark_trainable(model, verbose=False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    modules = dict(model.named_modules())
    linear_maps = {n for n, _ in named if n.endswith((".lora_A", ".lora_B"))
                   or (n.endswith(".weight") and isinstance(modules[n.rsplit(".", 1)[0]], torch.nn.Linear))}
    optimizer = p2_train.make_optimizer(named, 1e-3, 0.01)
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert optimizer.param_groups[0]["weight_decay"] == 0.01 and optimizer.param_groups[1]["weight_decay"] == 0.0
    assert {n for n, p in named if id(p) in decayed} == linear_maps
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(named)
    assert any(".prefix." in n for n, _ in named) == (peft == "prefix")


def test_mean_of_others_baseline():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    assert p2_train.mean_of_others(rewards).tolist() == [[2.5, 2.0, 1.5], [3.0, 3.0, 0.0]]


COLOURS = ("red", "blue", "green", "white")


class ColourReward:
    """A reward the captions' language can earn quickly: how often the image's own colour word
    (image i's is COLOURS[i]) appears in the caption. `placebo` deals each step's rewards out to
    its samples in a random order; `seen` keeps each step's true mean reward."""

    def __init__(self, placebo: bool):
        self.placebo, self.seen = placebo, []
        self.generator = torch.Generator().manual_seed(0)

    def score_candidates(self, keys: list, candidates: list) -> list:
        rewards = [float(text.split().count(COLOURS[key])) for key, text in zip(keys, candidates)]
        self.seen.append(sum(rewards) / len(rewards))
        if self.placebo:
            rewards = [rewards[i] for i in torch.randperm(len(rewards), generator=self.generator).tolist()]
        return rewards


def own_colour_rate(learner: p2_train.Learner, feats: torch.Tensor) -> float:
    """Mean count of each image's own colour word in 16 fresh samples per image."""
    from captioner import caption_text
    from tokenizer import EOT_ID

    learner.model.eval()
    with torch.no_grad():
        samples = learner.model.decoder.sample(feats, 16, 12, EOT_ID, top_k=5,
                                               generator=torch.Generator().manual_seed(9))
    words = [tokenize(caption_text(learner.tokenizer, ids)).split() for ids in samples]
    return sum(words[i].count(COLOURS[i // 16]) for i in range(len(words))) / len(words)


def scst_on_colours(setup: dict, tiny_vit_file: str, placebo: bool, steps: int = 30) -> tuple:
    """`steps` of Learner.scst_step (8 samples of 4 images, top-k 5, lr 2e-3, LoRA) on ColourReward
    from the caption-LM stand-in; the own-colour rate before and after, and the rewards seen."""
    torch.manual_seed(0)
    config = make_config("lora", encoder=TINY_VIT, encoder_kwargs=TINY_VIT_KWARGS, generation={"max_len": 12})
    model = Captioner(config, setup["decoder_weights"], tiny_vit_file)
    mark_trainable(model, verbose=False)
    args = p2_train.parse_args(["--print-params", "--scst-candidates", "sample", "--scst-top-k", "5",
                                "--scst-samples", "8"])  # the rest at the defaults
    args.cache_features, args.device = "(image tokens)", "cpu"
    learner = p2_train.Learner(model, torch.device("cpu"), args)
    learner.use_optimizer(2e-3, 0.0)
    with torch.no_grad():
        feats = model.encode(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    before = own_colour_rate(learner, feats)
    reward = ColourReward(placebo)
    for _ in range(steps):
        learner.scst_step(feats, list(range(4)), reward, 2e-3)
    return before, own_colour_rate(learner, feats), reward.seen


def test_the_scst_update_earns_the_reward_it_is_given_and_a_placebo_does_not(captioning_setup, tiny_vit_file):
    """The self-critical update itself: its sign, the mean-of-others baseline, and each reward
    reaching the sample that earned it. On a reward the model can earn within 30 steps (its image's
    colour word), SCST must raise the rate at which fresh samples say it; the same steps with each
    step's rewards shuffled among its samples (the placebo: same sampling, same size of updates)
    must not. A flipped sign, a baseline equal to the reward, or advantages dealt to the wrong
    samples each fail it (tried by editing scst_step, 2026-12-02); validation CIDEr on the synthetic
    set cannot tell such faults from noise (bench/RESULTS.md, bench_scst.py).

    Seeds 0-7 of this set-up (model, image tokens, sampling) were tried on 2026-12-02: fresh samples
    said their image's colour 0.12 times per caption before; after 30 SCST steps 2.7 to 6.3 times,
    after 30 placebo steps 0.0 to 1.0; the samples drawn during training went from 0.1-0.25 to
    2.4-5.6 (placebo: 0.0-1.1). At 20 steps the two overlapped (SCST 0.9-3.4, placebo up to 0.9)."""
    before, after, seen = scst_on_colours(captioning_setup, tiny_vit_file, placebo=False)
    placebo_before, placebo_after, placebo_seen = scst_on_colours(captioning_setup, tiny_vit_file, placebo=True)
    assert before == placebo_before < 0.5, (before, placebo_before)  # the same start, rarely saying the colour
    assert after > 2.0 and after > placebo_after + 1.0, (before, after, placebo_after)
    assert sum(seen[-5:]) / 5 > sum(seen[:5]) / 5 + 1.5, seen  # the samples drawn during training, too
    assert sum(placebo_seen[-5:]) / 5 < sum(seen[-5:]) / 5 - 1.0, (placebo_seen, seen)


class RecordingReward:
    """Scores every candidate 0 and keeps what it was shown."""

    def __init__(self):
        self.shown = []

    def score_candidates(self, keys: list, candidates: list) -> list:
        self.shown.append((list(keys), list(candidates)))
        return [0.0] * len(candidates)


def test_scst_with_beam_candidates_rewards_each_image_s_final_beams(captioning_setup, tiny_vit_file):
    """--scst-candidates beam: the captions rewarded are the images' --scst-samples final beams
    (Decoder.beam_candidates), image-major, each under its image's key; sampling draws differ."""
    from captioner import caption_text
    from tokenizer import EOT_ID

    torch.manual_seed(0)
    config = make_config("lora", encoder=TINY_VIT, encoder_kwargs=TINY_VIT_KWARGS, generation={"max_len": 12})
    model = Captioner(config, captioning_setup["decoder_weights"], tiny_vit_file)
    mark_trainable(model, verbose=False)
    with torch.no_grad():
        feats = model.encode(torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
        beams = model.decoder.beam_candidates(feats, 4, 12, EOT_ID)
    shown = {}
    for candidates in ("beam", "sample"):
        args = p2_train.parse_args(["--print-params", "--scst-candidates", candidates, "--scst-samples", "4"])
        args.cache_features, args.device = "(image tokens)", "cpu"
        learner = p2_train.Learner(model, torch.device("cpu"), args)
        learner.use_optimizer(1e-3, 0.0)
        reward = RecordingReward()
        learner.scst_step(feats, ["a", "b", "c"], reward, 1e-3)  # all advantages 0: the weights stay
        shown[candidates] = reward.shown[0]
    tokenizer = learner.tokenizer
    assert shown["beam"] == (["a"] * 4 + ["b"] * 4 + ["c"] * 4, [tokenize(caption_text(tokenizer, ids)) for ids in beams])
    assert shown["sample"][0] == shown["beam"][0] and shown["sample"][1] != shown["beam"][1]


def test_scst_starts_from_the_best_cross_entropy_weights(tmp_path, captioning_setup, monkeypatch):
    """Validation says step 0 (the fresh model) was best: SCST must start from it, not from step 6."""
    monkeypatch.setattr(p2_train.Trainer, "cider", lambda self, preds: 1.0 / (1 + self.progress["step"]))
    seen = {}
    next_phase = p2_train.Trainer.next_phase

    def record_last(self):
        seen["last"] = self.trainable()
        next_phase(self)

    def scst_step(self, x, keys, reward, lr):
        seen["first"] = {n: p.detach().clone() for n, p in self.named_params}
        raise Interrupted()

    monkeypatch.setattr(p2_train.Trainer, "next_phase", record_last)
    monkeypatch.setattr(p2_train.Learner, "scst_step", scst_step)
    out = tmp_path / "m.pt"
    with pytest.raises(Interrupted):
        run(train_args(captioning_setup, out, "--max-steps", "7", "--scst-max-steps", "1", "--val-every", "3", *QUICK))
    best = torch.load(out)["state_dict"]  # saved at step 0, the only best (adapter: nothing folded)
    assert [r["step"] for r in read_log(str(out)) if "saved" in r] == [0]
    assert all(torch.equal(seen["first"][name], best[name]) for name in best)
    assert any(not torch.equal(seen["last"][name], best[name]) for name in best)  # cross-entropy did move


def test_scst_raises_validation_cider_over_the_cross_entropy_best(tmp_path, captioning_setup):
    """Six cross-entropy steps (validated at 0, 3, 6), then 15 SCST steps from the best of them (8
    images x 8 samples, top-k 5, mean-of-others baseline, lr 3e-4; validated at 9, 12, .., 21).
    Cross-entropy stops early here, and there is no placebo control: this shows that the SCST phase
    runs end to end and ends above the cross-entropy best, not that the reward caused it (that the
    update earns its reward is the colour-word test above). From converged runs bench/bench_scst.py
    found a shuffled-reward placebo raising the best validation CIDEr as often and as much
    (bench/RESULTS.md).

    Seed 1 is pinned. With these settings seeds 0 to 5 were tried (2-core CPU, 2026-12-02): the best
    SCST validation beat the cross-entropy best on all 6 (gains +0.008, +0.078, +0.032, +0.066,
    +0.006, +0.033), which is what this asserts; a margin of 0.04 with the last validation still above
    held on only 2 of them, so it is not asserted. With 4 samples per image instead of 8 (43 s of CPU
    per run instead of about 60) the best beat the cross-entropy best on only 4 of the 6: on seeds 3
    and 4 SCST drifted down (0.50 -> 0.33 on seed 3, whose start captions all 30 images alike) while the
    samples' mean reward stayed flat (why 8 samples fixed that was not looked into further)."""
    out = tmp_path / "m.pt"
    run(train_args(captioning_setup, out, "--seed", "1", *QUICK, "--peft", "adapter", "--adapter-dim", "32",
                   "--max-steps", "21", "--val-every", "3", "--scst-epochs", "100",
                   "--scst-max-steps", "15", "--scst-batch-size", "8", "--scst-samples", "8", "--scst-lr", "3e-4",
                   "--scst-candidates", "sample", "--scst-top-k", "5",
                   "--log-every", "1"))
    log = read_log(str(out))
    xe = [r["val_cider"] for r in log if r["phase"] == "xe" and "val_cider" in r]
    scst = [r["val_cider"] for r in log if r["phase"] == "scst" and "val_cider" in r]
    steps = [r for r in log if "reward" in r]
    assert len(xe) == 3 and len(scst) == 5 and len(steps) == 15
    assert max(scst) > max(xe), (xe, scst)
    # the samples earn reward and about half beat their image's other samples
    assert all(r["reward"] > 0 and 0.2 < r["positive"] < 0.8 for r in steps), steps
    # the saved checkpoint holds the SCST best: the decoding grid (greedy only) re-scores it
    assert log[-1]["chosen"]["cider"] == pytest.approx(max(scst))


def test_decoding_is_chosen_on_validation_and_stored(tmp_path, captioning_setup, trained_checkpoint):
    log = read_log(trained_checkpoint)
    grid = [r for r in log if "decoding_grid" in r]
    assert len(grid) == 1 and len(grid[0]["decoding_grid"]) == 2
    chosen = grid[0]["chosen"]
    assert chosen["cider"] == max(r["cider"] for r in grid[0]["decoding_grid"])
    config = torch.load(trained_checkpoint)["config"]["generation"]
    assert (config["beam_size"], config["length_penalty"]) == (chosen["beam_size"], chosen["length_penalty"])


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
    run(train_args(captioning_setup, out, "--epochs", "1", "--scst-epochs", "0", "--max-steps", "2", *QUICK))
    with pytest.raises(SystemExit, match="exists: continue that run with --resume"):
        run(train_args(captioning_setup, out, "--scst-epochs", "0", "--max-steps", "2"))
    with pytest.raises(SystemExit, match="other model settings"):
        run(train_args(captioning_setup, out, "--scst-epochs", "0", "--max-steps", "3", "--resume", "--peft", "lora"))


def test_empty_captions_are_counted_and_no_caption_at_all_is_an_error(tmp_path, captioning_setup, broken_data,
                                                                      capsys):
    with open(broken_data / "train.json", encoding="utf-8") as f:
        data = json.load(f)
    for a in data["annotations"][:7]:
        a["caption"] = " "
    (broken_data / "train.json").write_text(json.dumps(data), encoding="utf-8")
    setup = dict(captioning_setup, data_root=str(broken_data))
    run(train_args(setup, tmp_path / "some.pt", "--epochs", "1", "--scst-epochs", "0", "--max-steps", "1", *QUICK))
    assert f"7 of {len(data['annotations'])} captions are empty" in capsys.readouterr().err

    for a in data["annotations"]:
        a["caption"] = ""
    (broken_data / "train.json").write_text(json.dumps(data), encoding="utf-8")
    expect_error(train_args(setup, tmp_path / "none.pt"), "none of its", tmp_path / "none.pt")


@pytest.mark.parametrize("option, values, message", [
    ("--decode-beams", ["1", "100000"], "--decode-beams"),
    ("--decode-length-penalties", ["0", "1e308"], "--decode-length-penalties"),
    ("--val-beam-size", ["100000"], "--val-beam-size"),
])
def test_decoding_values_beyond_their_range_fail_at_once(option, values, message, capsys):
    """Tried only after the whole training run (the decoding grid) unless checked with the options."""
    with pytest.raises(SystemExit):
        p2_train.parse_args(["--print-params", option, *values])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--scst-top-k", "5"], "--scst-top-k 5 has no effect with --scst-candidates beam"),
    (["--scst-top-p", "0.9"], "--scst-top-p 0.9 has no effect with --scst-candidates beam"),
    (["--scst-candidates", "sample", "--scst-top-k", "-1"], "argument --scst-top-k: expected an integer >= 0, got '-1'"),
    (["--scst-candidates", "sample", "--scst-top-p", "0"], "argument --scst-top-p: expected a number in (0, 1], got '0'"),
])
def test_sampling_options_are_refused_where_they_would_do_nothing_or_nonsense(argv, message, capsys):
    with pytest.raises(SystemExit):
        p2_train.parse_args(["--print-params", *argv])
    assert message in capsys.readouterr().err


def test_sampling_options_default_only_when_sampling():
    beams = p2_train.parse_args(["--print-params"])
    sampled = p2_train.parse_args(["--print-params", "--scst-candidates", "sample"])
    assert (beams.scst_candidates, beams.scst_top_k, beams.scst_top_p) == ("beam", None, None)
    assert (sampled.scst_top_k, sampled.scst_top_p) == (2, 1.0)


@pytest.mark.parametrize("option", ["--out", "--cache-features"])
def test_an_output_path_that_cannot_be_written_fails_before_the_model_loads(tmp_path, captioning_setup, monkeypatch,
                                                                           option):
    (tmp_path / "a_file").write_text("x")
    under_a_file = tmp_path / "a_file" / "below"

    def built(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(p2_train, "Captioner", built)
    args = (train_args(captioning_setup, under_a_file) if option == "--out" else
            train_args(captioning_setup, tmp_path / "m.pt", "--cache-features", under_a_file))
    with pytest.raises(SystemExit, match=f"{option}: .*is not a folder"):
        run(args)
