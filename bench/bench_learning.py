"""Does each PEFT method learn, and does self-critical training add to it? A tiny captioner on the
synthetic set, on the CPU, over several seeds.

For every seed and every --peft preset (none, adapter, prefix, lora, at small sizes): one
p2_train.py run as its command line makes it, with the same data, language model, ViT and
schedule: --steps cross-entropy steps validated every --val-every steps, then --scst-steps
SCST steps starting from the best cross-entropy weights (p2_train's own rule). Reported per
preset over the seeds: mean and spread (sample standard deviation) of the best cross-entropy
validation CIDEr and its step, of the best CIDEr during SCST, and of the gain (SCST best less
cross-entropy best; negative when SCST never got back to it).

    python3 bench/bench_learning.py [--lm caption|random] [--seeds 0 1 2] [--steps 300]
                                    [--scst-steps 40] [--work-dir DIR] [--out-json FILE]

The set (synthetic.make_dataset, 32x32 scenes), the ViT (random, 2 blocks) and the decoder
(a 2-layer GPT-2 of width 128) are the test suite's (tests/conftest.py). --lm caption teaches the
decoder the captions' language first (synthetic.pretrain_caption_lm), the stand-in for GPT-2's
pretraining; --lm random leaves it random, so only the new modules can learn the language. The
ViT's features are cached once before the timed runs. Results are written to --out-json after
every run, seed by seed, so an interrupted benchmark keeps what it measured. The numbers say
which method moves on a toy problem; they say nothing about the real data's scores.
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import p2_train
import synthetic
from encoder import ImageEncoder
from file_io import atomic_write_text
from p2_data import FeatureCache, Split, normalize_caption
from tokenizer import BPETokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VIT = "vit_tiny_patch16_224"
TINY_VIT_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
PRESETS = {
    "none": [],
    "adapter": ["--adapter-dim", "32"],
    "prefix": ["--prefix-len", "8", "--prefix-hidden", "64"],
    "lora": ["--lora-rank", "8", "--lora-alpha", "16"],
}
# What a tiny CPU run learns with (tests/conftest.py's settings, the warm-up now a fraction of the run);
# decoding stays greedy: the grid would cost nine validations per run and is not what is measured here.
TRAIN_ARGS = ["--device", "cpu", "--lr", "3e-3", "--max-len", "16", "--log-every", "5", "--save-every", "100000",
              "--decode-beams", "1", "--decode-length-penalties", "0"]


def build_setup(work: str, n_train: int, n_val: int, lm: str) -> dict:
    """Synthetic set, the decoder (decoder_model.bin), tiny ViT weights, cached features."""
    data_root = os.path.join(work, "p2_data")
    synthetic.make_dataset(data_root, n_train=n_train, n_val=n_val, image_size=32, seed=0)
    tokenizer = BPETokenizer()
    with open(os.path.join(data_root, "train.json"), encoding="utf-8") as f:
        captions = [tokenizer.encode(normalize_caption(a["caption"])) for a in json.load(f)["annotations"]]
    decoder_weights = os.path.join(work, "decoder_model.bin")
    torch.save(synthetic.pretrain_caption_lm(captions, steps=150 if lm == "caption" else 0),
               decoder_weights)

    import timm

    torch.manual_seed(0)
    encoder_weights = os.path.join(work, "tiny_vit.pth")
    torch.save(timm.create_model(TINY_VIT, pretrained=False, **TINY_VIT_KWARGS).state_dict(), encoder_weights)
    features = os.path.join(work, "features")
    encoder = ImageEncoder(TINY_VIT, weights=encoder_weights, model_kwargs=TINY_VIT_KWARGS)
    for split in ("train", "val"):  # the folder p2_train's --cache-features finds, keyed by the same encoder
        FeatureCache(features, encoder, Split(data_root, split, tokenizer), torch.device("cpu"))
    return {"args": ["--data-root", data_root, "--decoder-weights", decoder_weights, "--encoder", TINY_VIT,
                     "--encoder-weights", encoder_weights, "--encoder-kwargs", json.dumps(TINY_VIT_KWARGS),
                     "--cache-features", features, *TRAIN_ARGS],
            "n_train_captions": len(captions)}


def read_log(out: str) -> dict:
    """Validation CIDEr by step and phase, the best of each phase, the SCST phase's last records."""
    with open(out + ".log.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    curve = [(r["step"], r["phase"], r["val_cider"]) for r in records if "val_cider" in r]
    best = {}
    for phase in ("xe", "scst"):
        points = [(step, cider) for step, p, cider in curve if p == phase]
        if points:
            step, cider = max(points, key=lambda sc: (sc[1], -sc[0]))  # the earliest of equal bests
            best[phase] = {"cider": cider, "step": step}
    scst = [r for r in records if r["phase"] == "scst" and "reward" in r]
    return {"curve": curve, "best": best,
            "scst_steps": [{k: r[k] for k in ("step", "reward", "positive", "sample_logp")} for r in scst]}


def cross_entropy_argv(setup: dict, out: str, preset: str, seed: int, args) -> list:
    """p2_train's options for one run of the set: the preset, the seed, and --steps cross-entropy
    steps of --batch-size captions validated every --val-every steps (the SCST options are the caller's)."""
    return [*setup["args"], "--out", out, "--peft", preset, *PRESETS[preset], "--seed", str(seed),
            "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--val-every", str(args.val_every)]


def run_one(work: str, setup: dict, preset: str, seed: int, args) -> dict:
    out = os.path.join(work, f"{preset}-seed{seed}", "model.pt")
    argv = [*cross_entropy_argv(setup, out, preset, seed, args),
            "--scst-epochs", str(args.scst_steps and 1000), "--scst-max-steps", str(args.scst_steps),
            "--scst-lr", str(args.scst_lr), "--scst-batch-size", str(args.scst_images),
            "--scst-candidates", "sample",  # as its recorded results were made; bench_scst.py compares beams
            "--scst-samples", str(args.scst_samples), "--scst-top-k", str(args.scst_top_k),
            "--max-steps", str(args.steps + args.scst_steps)]  # the whole run's steps: SCST's come after --steps
    start = time.perf_counter()
    p2_train.Trainer.from_args(p2_train.parse_args(argv)).run()
    result = {"preset": preset, "seed": seed, "seconds": round(time.perf_counter() - start, 1), **read_log(out)}
    xe, scst = result["best"]["xe"], result["best"].get("scst")
    print(f"{preset} seed {seed}: cross-entropy best {xe['cider']:.3f} at step {xe['step']}"
          + (f", SCST best {scst['cider']:.3f} at step {scst['step']}" if scst else "")
          + f" ({result['seconds']:.0f} s)", file=sys.stderr)
    return result


def spread(values: list) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: list) -> str:
    """Markdown, one row per preset: mean ± sample standard deviation over its seeds."""
    rows = ["| preset | seeds | CIDEr at step 0 | best cross-entropy CIDEr | at step | best SCST CIDEr "
            "| gain (SCST - cross-entropy) | SCST runs above the cross-entropy best |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for preset in PRESETS:
        runs = [r for r in results if r["preset"] == preset]
        if not runs:
            continue
        xe = [r["best"]["xe"]["cider"] for r in runs]
        scst = [r["best"]["scst"]["cider"] for r in runs if "scst" in r["best"]]
        gains = [r["best"]["scst"]["cider"] - r["best"]["xe"]["cider"] for r in runs if "scst" in r["best"]]
        rows.append(f"| {preset} | {len(runs)} | {spread([r['curve'][0][2] for r in runs])} | {spread(xe)} "
                    f"| {spread([float(r['best']['xe']['step']) for r in runs])} | {spread(scst)} | {spread(gains)} "
                    f"| {sum(g > 0 for g in gains)} of {len(gains)} |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm", choices=["caption", "random"], default="caption",
                        help="decoder stand-in: taught the captions' language, or random weights")
    parser.add_argument("--n-train", type=int, default=48, help="training images, 5 captions each (48)")
    parser.add_argument("--n-val", type=int, default=16, help="validation images (16)")
    parser.add_argument("--batch-size", type=int, default=8, help="captions per cross-entropy step (8)")
    parser.add_argument("--steps", type=int, default=300, help="cross-entropy steps per run (300)")
    parser.add_argument("--val-every", type=int, default=20, help="validate every N steps (20)")
    parser.add_argument("--scst-steps", type=int, default=40, help="SCST steps after cross-entropy (40; 0: none)")
    parser.add_argument("--scst-images", type=int, default=8, help="images per SCST step (8)")
    parser.add_argument("--scst-samples", type=int, default=5, help="sampled captions per image (5)")
    parser.add_argument("--scst-top-k", type=int, default=5, help="sampling among the k likeliest tokens (5)")
    parser.add_argument("--scst-lr", type=float, default=1e-4, help="SCST learning rate (1e-4)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="training seeds, one run per seed and preset (default: %(default)s)")
    parser.add_argument("--presets", nargs="+", choices=list(PRESETS), default=list(PRESETS),
                        help="PEFT presets to train (default: all)")
    parser.add_argument("--work-dir", help="keep data, models and logs here (default: a temporary folder)")
    parser.add_argument("--out-json", help="write the numbers here, after every run (default: printed only)")
    args = parser.parse_args()

    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here downloads; a hub miss would retry for ~47 s
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_learning_")
    if os.path.isdir(work) and os.listdir(work):
        raise SystemExit(f"error: --work-dir {work!r} is not empty; the runs would collide with earlier ones")
    start = time.perf_counter()
    setup = build_setup(work, args.n_train, args.n_val, args.lm)
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores, "
                  f"{torch.get_num_threads()} torch threads",
        "torch": torch.__version__, "settings": {k: v for k, v in vars(args).items() if k != "out_json"},
        "n_train_captions": setup["n_train_captions"], "train_args": TRAIN_ARGS,
        "setup_seconds": round(time.perf_counter() - start, 1), "results": [],
    }
    for seed in args.seeds:  # seed by seed: an interrupted benchmark has every preset at least once
        for preset in args.presets:
            summary["results"].append(run_one(work, setup, preset, seed, args))
            summary["total_seconds"] = round(time.perf_counter() - start, 1)
            if args.out_json:
                atomic_write_text(args.out_json, json.dumps(summary, indent=1) + "\n")
    print(table(summary["results"]))
    print(f"\n{summary['device']}, torch {summary['torch']}; decoder stand-in: {args.lm}; {args.n_train} training "
          f"images ({setup['n_train_captions']} captions), {args.n_val} validation images; "
          f"total {summary['total_seconds']:.0f} s")
    if not args.work_dir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
