"""Which self-critical settings raise validation CIDEr over the cross-entropy best? Several SCST
settings tried from the same cross-entropy run, over presets and seeds, on the CPU.

For every seed and --peft preset: one cross-entropy run through p2_train (bench_learning.py's set,
stand-ins and settings, no SCST), then, for every --configs entry, p2_train's SCST phase started from
that run's best weights exactly as p2_train would start it (its `next_phase`), in its own folder,
validated every --val-every steps and at every SCST epoch's end. Per run: the cross-entropy best, the
best and the last validation CIDEr during SCST, the samples' mean reward (as logged, every 5 steps)
in the first and second half of the phase. Per setting and preset over the seeds: mean and spread of
the gain (SCST best less cross-entropy best) and how many runs it raised.

    python3 bench/bench_scst.py --configs LR:TOP_K:SAMPLES:IMAGES:STEPS[:placebo] [...] [--lm caption|random]
                                [--seeds 0 1 2] [--steps 300] [--n-val 48] [--n-test 480] --work-dir DIR --out-json FILE

A configuration's runs share the cross-entropy weights, so its differences are SCST's own. A
configuration ending in `:placebo` is the control: the same phase with each step's rewards shuffled
among its samples (ShuffledReward), which shows how much of a "gain" the best of many validations of
a perturbed model gives by chance. The cross-entropy runs are kept in --work-dir and reused when the
benchmark is started again with the same folder (for other settings or seeds); results already in
--out-json are skipped.

Validation chooses the cross-entropy run's best weights, so their validation CIDEr is the maximum of
many noisy readings and later ones regress from it by chance. --n-test scores, on a held-out set
(--n-test images of another synthetic seed) that chose nothing, the cross-entropy best, the weights
the SCST run would ship (its best by validation, which is the cross-entropy best when SCST never beat
it) and its last weights; the comparison that says whether turning SCST on pays. Runs measured
before --n-test was given are scored from their saved training states.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_learning
import p2_train
import synthetic
from file_io import atomic_write_text
from weights import torch_load

# what the finished cross-entropy run hands to the SCST phase (the rest of the progress is the phase's own)
CARRIED = ("step", "validated_step", "best_cider", "best_step", "xe_best_cider", "xe_best_step")


def parse_config(text: str) -> dict:
    parts = text.split(":")
    if len(parts) not in (5, 6) or parts[5:] not in ([], ["placebo"]):
        raise argparse.ArgumentTypeError(f"{text!r}: expected LR:TOP_K:SAMPLES:IMAGES:STEPS[:placebo], "
                                         "e.g. 1e-4:5:8:8:60 (TOP_K beam: the final beams)")
    lr, top_k, samples, images, steps = parts[:5]
    beam = top_k == "beam"  # the image's final beams instead of samples
    return {"name": text, "lr": float(lr), "top_k": 0 if beam else int(top_k), "beam": beam,
            "samples": int(samples), "images": int(images), "steps": int(steps), "placebo": len(parts) == 6}


class ShuffledReward:
    """The placebo: each step's CIDEr-D rewards dealt out to its samples in a random order, so the
    updates are as large and as many as SCST's but carry no information about the captions. What
    validation gains it shows are what any such perturbation of the weights, validated as often,
    would show by chance."""

    def __init__(self, reward, seed: int):
        self.reward = reward
        self.generator = torch.Generator().manual_seed(seed)

    def score_candidates(self, keys: list, candidates: list) -> list:
        scores = self.reward.score_candidates(keys, candidates)
        return [scores[i] for i in torch.randperm(len(scores), generator=self.generator).tolist()]


def run_path(work: str, preset: str, seed: int, config: str | None = None) -> str:
    """The checkpoint path of a cross-entropy run (config None) or of an SCST run with that setting."""
    folder = f"xe-{preset}-seed{seed}" if config is None else f"scst-{preset}-seed{seed}-{config.replace(':', '_')}"
    return os.path.join(work, folder, "model.pt")


def train_argv(setup: dict, out: str, preset: str, seed: int, args, config: dict | None = None) -> list:
    argv = bench_learning.cross_entropy_argv(setup, out, preset, seed, args)
    if config is None:
        return [*argv, "--scst-epochs", "0"]
    return [*argv, "--scst-epochs", "1000", "--scst-max-steps", str(config["steps"]), "--scst-lr", str(config["lr"]),
            *(["--scst-candidates", "beam"] if config["beam"] else
              ["--scst-candidates", "sample", "--scst-top-k", str(config["top_k"])]),
            "--scst-samples", str(config["samples"]),
            "--scst-batch-size", str(config["images"]),
            "--max-steps", str(args.steps + config["steps"])]  # the whole run's steps: SCST's come after --steps


def remove_leftovers(out: str) -> None:
    """An interrupted run's files: it starts over (p2_train refuses to overwrite them)."""
    for leftover in (out + ".state", out + ".log.jsonl"):
        if os.path.exists(leftover):
            os.remove(leftover)


def cross_entropy_run(work: str, setup: dict, preset: str, seed: int, args) -> dict:
    """The finished cross-entropy run's training state (trained now unless an earlier start left it)."""
    out = run_path(work, preset, seed)
    if not (os.path.exists(out + ".state") and torch_load(out + ".state")["progress"]["phase"] == "done"):
        remove_leftovers(out)
        p2_train.Trainer.from_args(p2_train.parse_args(train_argv(setup, out, preset, seed, args))).run()
    return torch_load(out + ".state")


def scst_run(work: str, setup: dict, preset: str, seed: int, config: dict, xe_state: dict, args) -> dict:
    out = run_path(work, preset, seed, config["name"])
    remove_leftovers(out)  # a finished run's result is in --out-json and is not run again
    trainer = p2_train.Trainer.from_args(p2_train.parse_args(train_argv(setup, out, preset, seed, args, config)))
    if config["placebo"]:
        trainer.reward = ShuffledReward(trainer.reward, seed)
    # the state the cross-entropy phase ends in; next_phase then loads the best weights and starts SCST
    trainer.best_weights = xe_state["best"]
    trainer.progress.update({k: xe_state["progress"][k] for k in CARRIED}, phase="xe", phase_step=trainer.xe_total)
    torch.set_rng_state(xe_state["rng"]["torch"])
    start = time.perf_counter()
    trainer.next_phase()
    trainer.scst_phase()
    log = bench_learning.read_log(out)
    curve = [(step, cider) for step, phase, cider in log["curve"] if phase == "scst"]
    rewards = [r["reward"] for r in log["scst_steps"]]
    half = len(rewards) // 2
    return {"preset": preset, "seed": seed, "config": config["name"], "seconds": round(time.perf_counter() - start, 1),
            "xe_best": xe_state["progress"]["xe_best_cider"], "xe_best_step": xe_state["progress"]["xe_best_step"],
            "scst_best": max(c for _, c in curve), "scst_last": curve[-1][1], "curve": curve,
            "reward_first_half": statistics.mean(rewards[:half]), "reward_second_half": statistics.mean(rewards[half:]),
            "scst_steps": log["scst_steps"]}


def held_out_root(work: str, setup: dict, n_test: int) -> str:
    """A data root whose val split is n_test images of another synthetic seed and whose train split
    is the benchmark's (p2_train wants both): made once, in work."""
    root = os.path.join(work, f"held-out-{n_test}")
    if not os.path.exists(os.path.join(root, "val.json")):
        data_root = setup["args"][setup["args"].index("--data-root") + 1]
        fresh = root + ".partial"
        shutil.rmtree(fresh, ignore_errors=True)  # an interrupted start's
        synthetic.make_dataset(fresh, n_train=0, n_val=n_test, image_size=32, seed=1)
        os.remove(os.path.join(fresh, "train.json"))
        os.rmdir(os.path.join(fresh, "images", "train"))
        os.symlink(os.path.join(data_root, "train.json"), os.path.join(fresh, "train.json"))
        os.symlink(os.path.join(data_root, "images", "train"), os.path.join(fresh, "images", "train"))
        os.replace(fresh, root)
    return root


class HeldOut:
    """Greedy CIDEr-D on the held-out set of a preset's weights (p2_train's own captioning and scorer)."""

    def __init__(self, work: str, setup: dict, n_test: int, args):
        self.root = held_out_root(work, setup, n_test)
        self.work, self.setup, self.args, self.trainers = work, setup, args, {}

    def score(self, preset: str, weights: dict) -> float:
        if preset not in self.trainers:
            argv = bench_learning.cross_entropy_argv(self.setup, os.path.join(self.work, "held-out-scoring.pt"),
                                                     preset, 0, self.args)
            cache = argv.index("--cache-features")  # its features are the benchmark's splits', not these images'
            argv = [*argv[:cache], *argv[cache + 2:]]
            argv[argv.index("--data-root") + 1] = self.root
            self.trainers[preset] = p2_train.Trainer.from_args(p2_train.parse_args(argv))
        trainer = self.trainers[preset]
        trainer.load_weights(weights)
        return trainer.cider(trainer.caption_val(1))


def score_held_out(work: str, results: list, held_out: HeldOut) -> None:
    """test_xe_best, test_shipped, test_last for every result that lacks them, from the saved states."""
    xe_scores = {}
    for r in results:
        if "test_last" in r:
            continue
        key = (r["preset"], r["seed"])
        if key not in xe_scores:
            xe_state = torch_load(run_path(work, r["preset"], r["seed"]) + ".state")
            xe_scores[key] = held_out.score(r["preset"], xe_state["best"])
        state = torch_load(run_path(work, r["preset"], r["seed"], r["config"]) + ".state")
        r.update(test_xe_best=xe_scores[key], test_shipped=held_out.score(r["preset"], state["best"]),
                 test_last=held_out.score(r["preset"], state["trainable"]))


def held_out_table(results: list) -> str:
    """Per setting and preset over the seeds: held-out CIDEr of the cross-entropy best, of what the SCST
    run ships and of its last weights, and the gains over the cross-entropy best."""
    rows = ["| setting | preset | runs | cross-entropy best | SCST run's shipped weights | SCST last "
            "| shipped - cross-entropy | last - cross-entropy | last higher |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for config in dict.fromkeys(r["config"] for r in results):
        for preset in bench_learning.PRESETS:
            runs = [r for r in results if r["config"] == config and r["preset"] == preset and "test_last" in r]
            if not runs:
                continue
            column = lambda key: bench_learning.spread([r[key] for r in runs])  # noqa: E731
            last_gain = [r["test_last"] - r["test_xe_best"] for r in runs]
            rows.append(f"| {config} | {preset} | {len(runs)} | {column('test_xe_best')} | {column('test_shipped')} "
                        f"| {column('test_last')} "
                        f"| {bench_learning.spread([r['test_shipped'] - r['test_xe_best'] for r in runs])} "
                        f"| {bench_learning.spread(last_gain)} | {sum(g > 0 for g in last_gain)} |")
    return "\n".join(rows)


def table(results: list) -> str:
    rows = ["| setting (lr:top-k:samples:images:steps) | preset | runs | cross-entropy best | SCST best | SCST last "
            "| gain (best - cross-entropy) | runs raised | sample reward, 1st -> 2nd half |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for config in dict.fromkeys(r["config"] for r in results):
        for preset in bench_learning.PRESETS:
            runs = [r for r in results if r["config"] == config and r["preset"] == preset]
            if not runs:
                continue
            gains = [r["scst_best"] - r["xe_best"] for r in runs]
            column = lambda key: bench_learning.spread([r[key] for r in runs])  # noqa: E731
            rows.append(f"| {config} | {preset} | {len(runs)} | {column('xe_best')} | {column('scst_best')} "
                        f"| {column('scst_last')} | {bench_learning.spread(gains)} | {sum(g > 0 for g in gains)} "
                        f"| {column('reward_first_half')} -> {column('reward_second_half')} |")
    return "\n".join(rows)


def against_placebo(results: list, measures: dict) -> str:
    """Each setting against its placebo on the same cross-entropy runs (preset and seed paired): for
    each of `measures` (result key -> its name), mean ± spread of SCST's value less the placebo's and
    how many pairs SCST won."""
    by_run = {(r["config"], r["preset"], r["seed"]): r for r in results}
    head = "".join(f" {name}: SCST - placebo | SCST {name} higher |" for name in measures.values())
    rows = ["| setting | pairs |" + head, "|---|---:|" + "---:|---:|" * len(measures)]
    for config in dict.fromkeys(r["config"] for r in results if not r["config"].endswith(":placebo")):
        pairs = [(r, by_run[(config + ":placebo", r["preset"], r["seed"])]) for r in results
                 if r["config"] == config and (config + ":placebo", r["preset"], r["seed"]) in by_run
                 and all(key in r and key in by_run[(config + ":placebo", r["preset"], r["seed"])]
                         for key in measures)]
        if not pairs:
            continue
        row = f"| {config} | {len(pairs)} |"
        for key in measures:
            differences = [a[key] - b[key] for a, b in pairs]
            row += f" {bench_learning.spread(differences)} | {sum(d > 0 for d in differences)} |"
        rows.append(row)
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=parse_config, nargs="+", required=True,
                        help="SCST settings LR:TOP_K:SAMPLES:IMAGES:STEPS, e.g. 1e-4:5:8:8:60; "
                             "with :placebo appended, the control with shuffled rewards")
    parser.add_argument("--lm", choices=["caption", "random"], default="caption",
                        help="decoder stand-in: taught the captions' language, or random weights")
    parser.add_argument("--n-train", type=int, default=48, help="training images, 5 captions each (48)")
    parser.add_argument("--n-val", type=int, default=48, help="validation images (48)")
    parser.add_argument("--batch-size", type=int, default=4, help="captions per cross-entropy step (4)")
    parser.add_argument("--steps", type=int, default=300, help="cross-entropy steps per run (300)")
    parser.add_argument("--val-every", type=int, default=30, help="validate every N steps (30)")
    parser.add_argument("--n-test", type=int, default=0,
                        help="held-out images (another synthetic seed) to score the chosen weights on (0: none)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="training seeds, one run per seed, preset and config (default: %(default)s)")
    parser.add_argument("--presets", nargs="+", choices=list(bench_learning.PRESETS),
                        default=list(bench_learning.PRESETS), help="PEFT presets to train (default: all)")
    parser.add_argument("--work-dir", required=True, help="data, cross-entropy runs and SCST runs (kept, reused)")
    parser.add_argument("--out-json", required=True, help="the results, written after every run (kept, extended)")
    args = parser.parse_args()

    os.environ["HF_HUB_OFFLINE"] = "1"
    setup_file = os.path.join(args.work_dir, "setup.json")
    if os.path.exists(setup_file):
        with open(setup_file, encoding="utf-8") as f:
            setup = json.load(f)
        wanted = {"lm": args.lm, "n_train": args.n_train, "n_val": args.n_val}
        if any(setup.get(k) != v for k, v in wanted.items()):
            raise SystemExit(f"error: --work-dir {args.work_dir!r} holds a set made with "
                             f"{ {k: setup.get(k) for k in wanted} }, not {wanted}")
    else:
        os.makedirs(args.work_dir, exist_ok=True)
        setup = {**bench_learning.build_setup(args.work_dir, args.n_train, args.n_val, args.lm), "lm": args.lm,
                 "n_train": args.n_train, "n_val": args.n_val}
        atomic_write_text(setup_file, json.dumps(setup))
    results = []
    if os.path.exists(args.out_json):
        with open(args.out_json, encoding="utf-8") as f:
            results = json.load(f)["results"]

    def save():
        summary = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
                   "lm": args.lm, "n_train": args.n_train, "n_val": args.n_val, "steps": args.steps,
                   "batch_size": args.batch_size, "n_test": args.n_test, "results": results}
        atomic_write_text(args.out_json, json.dumps(summary, indent=1) + "\n")

    done = {(r["preset"], r["seed"], r["config"]) for r in results}
    for seed in args.seeds:
        for preset in args.presets:
            todo = [c for c in args.configs if (preset, seed, c["name"]) not in done]
            if not todo:
                continue
            xe_state = cross_entropy_run(args.work_dir, setup, preset, seed, args)
            for config in todo:
                result = scst_run(args.work_dir, setup, preset, seed, config, xe_state, args)
                results.append(result)
                print(f"{preset} seed {seed} {config['name']}: cross-entropy best {result['xe_best']:.3f}, SCST best "
                      f"{result['scst_best']:.3f}, last {result['scst_last']:.3f} ({result['seconds']:.0f} s)",
                      file=sys.stderr)
                save()
    if args.n_test:
        score_held_out(args.work_dir, results, HeldOut(args.work_dir, setup, args.n_test, args))
        save()
    print(table(results))
    if any(r["config"].endswith(":placebo") for r in results):
        print("\n" + against_placebo(results, {"scst_best": "best", "scst_last": "last"}))
    if args.n_test:
        print(f"\nHeld out ({args.n_test} images of another seed, greedy CIDEr-D):\n" + held_out_table(results))
        print("\n" + against_placebo(results, {"test_shipped": "shipped", "test_last": "last"}))


if __name__ == "__main__":
    main()
