"""Does each PEFT method learn, and how fast? A tiny captioner on the synthetic set, on the CPU.

For every --peft choice (none, adapter, prefix, lora, at small sizes) one
p2_train.py run from its command line with the same data, language model,
ViT, seed and schedule: validation CIDEr before training (p2_train validates
at step 0, where the new modules are the identity and GPT-2 captions every
image alike) and during it, the best one and its step, the final loss, the
wall time. Then optionally self-critical training (SCST) for a few steps on
top of the method with the best CIDEr, continuing its run with --resume.

    python3 bench/bench_learning.py [--n-train 80] [--n-val 20] [--epochs 2] [--batch-size 16] [--steps 0]
                                    [--scst-steps 4] [--work-dir DIR] [--out-json FILE]

The set (synthetic.make_dataset, 32x32 scenes), the language model (a 2-layer
GPT-2 taught the captions' language, synthetic.pretrain_caption_lm) and the
ViT (random, 2 blocks) are the test suite's (tests/conftest.py), and so are the
optimiser settings. The ViT's features are cached once before the timed runs,
so no method pays for building the cache. The numbers say which method moves
fastest on a toy problem; they say nothing about the real data's scores.
"""
import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import p2_train
import synthetic
from captioner import count_parameters, read_checkpoint
from encoder import ImageEncoder
from io_utils import torch_load
from p2_data import FeatureCache, Split, normalize_caption
from tokenizer import BPETokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VIT = "vit_tiny_patch16_224"
TINY_VIT_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
METHODS = {
    "none": [],
    "adapter": ["--adapter-dim", "32"],
    "prefix": ["--prefix-len", "8", "--prefix-hidden", "64"],
    "lora": ["--lora-rank", "8", "--lora-alpha", "16"],
}
# tests/conftest.py's train_args (its batch size is --batch-size here): the settings a tiny CPU run learns with
TRAIN_ARGS = ["--device", "cpu", "--lr", "3e-3", "--warmup-steps", "5", "--max-len", "16",
              "--log-every", "1", "--save-every", "100000", "--seed", "0"]
SCST_LR = 1.5e-4  # p2_train's default --scst-lr : --lr ratio (1e-5 : 2e-4) applied to the 3e-3 above
SCST_IMAGES = 8  # per SCST step (p2_train: 16), 5 samples each
LAST_LOSSES = 10  # the final loss is the mean over this many last steps


def build_setup(work: str, n_train: int, n_val: int) -> dict:
    """Synthetic set, caption language model (decoder_model.bin), tiny ViT weights, cached features."""
    data_root = os.path.join(work, "p2_data")
    synthetic.make_dataset(data_root, n_train=n_train, n_val=n_val, image_size=32, seed=0)
    tokenizer = BPETokenizer()
    with open(os.path.join(data_root, "train.json"), encoding="utf-8") as f:
        captions = [tokenizer.encode(normalize_caption(a["caption"])) for a in json.load(f)["annotations"]]
    decoder_weights = os.path.join(work, "decoder_model.bin")
    torch.save(synthetic.pretrain_caption_lm(captions).transformer.state_dict(), decoder_weights)

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


def train(argv: list) -> tuple:
    """One p2_train run as its main() does it; -> (trainable parameters while training, seconds)."""
    start = time.perf_counter()
    trainer = p2_train.Trainer.from_args(p2_train.parse_args(argv))
    trainer.run()
    return sum(p.numel() for p in trainer.params), time.perf_counter() - start


def read_log(out: str, phase: str, since: int = 0) -> dict:
    """CIDEr from step `since` on (the first is the starting point), the phase's last losses."""
    with open(out + ".log.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    # p2_train validates twice at a step that ends an epoch (or the run) and is a multiple of --val-every
    cider = list({r["step"]: r["val_cider"] for r in records if "val_cider" in r and r["step"] >= since}.items())
    last = [r for r in records if r["phase"] == phase and "loss" in r][-LAST_LOSSES:]
    best_step, best = max(cider, key=lambda sc: (sc[1], -sc[0]))  # the earliest of equal bests
    result = {"cider_start": cider[0][1], "best_cider": best, "best_step": best_step, "cider_curve": cider,
              "final_loss": sum(r["loss"] for r in last) / len(last), "steps": records[-1]["step"]}
    if phase == "scst":
        result["final_reward"] = sum(r["reward"] for r in last) / len(last)
        result["final_baseline"] = sum(r["baseline"] for r in last) / len(last)
    return result


def run_method(work: str, setup: dict, method: str, args) -> tuple:
    """Cross-entropy training with one PEFT method; -> (numbers, its p2_train arguments, its --out)."""
    out = os.path.join(work, method, "model.pt")
    argv = [*setup["args"], "--out", out, "--peft", method, *METHODS[method], "--batch-size", str(args.batch_size),
            "--epochs", str(args.epochs), "--max-steps", str(args.steps), "--val-every", str(args.val_every),
            "--scst-epochs", "0"]
    training_params, seconds = train(argv)
    saved = count_parameters(read_checkpoint(out)["state_dict"])
    result = {"method": method, "options": " ".join(METHODS[method]), "trainable_params": training_params,
              "saved_params": saved, "seconds": round(seconds, 1), **read_log(out, "xe")}
    return result, argv, out


def run_scst(work: str, argv: list, out: str, method: str, steps: int) -> dict:
    """SCST for `steps` steps, continuing a finished cross-entropy run (a copy of its files) with --resume.

    The resumed run's --epochs is the epoch the cross-entropy phase stopped in, so
    it goes straight to SCST (a run cut by --max-steps mid-epoch would otherwise
    finish that epoch first); SCST starts from the last model, not the best.
    """
    scst_out = os.path.join(work, method + "+scst", "model.pt")
    os.makedirs(os.path.dirname(scst_out))
    for suffix in ("", ".state", ".log.jsonl", ".val.json"):
        shutil.copy(out + suffix, scst_out + suffix)
    progress = torch_load(out + ".state")["progress"]
    argv = list(argv)
    argv[argv.index("--out") + 1] = scst_out
    argv[argv.index("--epochs") + 1] = str(progress["epoch"])
    argv[argv.index("--max-steps") + 1] = str(progress["step"] + steps)
    argv[argv.index("--scst-epochs") + 1] = "1"
    argv += ["--scst-lr", str(SCST_LR), "--scst-batch-size", str(SCST_IMAGES), "--scst-samples", "5", "--resume"]
    _, seconds = train(argv)
    return {"method": f"{method} + SCST", "options": f"{steps} SCST steps from step {progress['step']}",
            "seconds": round(seconds, 1), **read_log(scst_out, "scst", since=progress["step"])}


def table(results: list) -> str:
    """Markdown; an SCST row's first CIDEr is where it started, its loss column the mean reward."""
    rows = ["| method | trainable params | CIDEr at step 0 | best CIDEr | at step | final loss | wall time |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "final_reward" in r:
            params, start = "as above", f"{r['cider_start']:.3f} (at step {r['cider_curve'][0][0]})"
            loss = f"reward {r['final_reward']:.3f} (greedy {r['final_baseline']:.3f})"
        else:
            params, start, loss = f"{r['trainable_params']:,}", f"{r['cider_start']:.3f}", f"{r['final_loss']:.3f}"
            if r["saved_params"] != r["trainable_params"]:
                params += f" ({r['saved_params']:,} saved)"
        rows.append(f"| {r['method']} | {params} | {start} | {r['best_cider']:.3f} | {r['best_step']} | {loss} "
                    f"| {r['seconds']:.0f} s |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=80, help="training images, 5 captions each (80)")
    parser.add_argument("--n-val", type=int, default=20, help="validation images (20)")
    parser.add_argument("--epochs", type=int, default=2, help="cross-entropy epochs (2)")
    parser.add_argument("--batch-size", type=int, default=16, help="captions per step (16)")
    parser.add_argument("--steps", type=int, default=0, help="stop each run after this many steps (0: all epochs)")
    parser.add_argument("--val-every", type=int, default=10, help="validate every N steps as well (10)")
    parser.add_argument("--scst-steps", type=int, default=4, help="SCST steps on the best method (4; 0: none)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--work-dir", help="keep data, models and logs here (default: a temporary folder)")
    parser.add_argument("--out-json", help="also write the numbers here")
    args = parser.parse_args()

    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here downloads; a hub miss would retry for ~47 s
    # GPT-2's vocabulary where the tokenizer looks (HW3_BPE_DIR, the repository, its cache), else the test suite's
    os.environ.setdefault("HW3_BPE_DIR", os.path.join(REPO, "..", "shared", "gpt2"))
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_learning_")
    if os.path.isdir(work) and os.listdir(work):
        raise SystemExit(f"error: --work-dir {work!r} is not empty; the runs would collide with earlier ones")
    start = time.perf_counter()
    setup = build_setup(work, args.n_train, args.n_val)
    setup_seconds = time.perf_counter() - start

    results, runs = [], {}
    for method in args.methods:
        result, argv, out = run_method(work, setup, method, args)
        results.append(result)
        runs[method] = (argv, out)
        print(f"{method}: best CIDEr {result['best_cider']:.3f} at step {result['best_step']} "
              f"({result['seconds']:.0f} s)", file=sys.stderr)
    if args.scst_steps:
        best = max(results, key=lambda r: r["best_cider"])["method"]
        results.append(run_scst(work, *runs[best], best, args.scst_steps))

    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "device": f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores, "
                  f"{torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "n_train_images": args.n_train, "n_train_captions": setup["n_train_captions"], "n_val_images": args.n_val,
        "epochs": args.epochs, "batch_size": args.batch_size, "max_steps": args.steps, "val_every": args.val_every,
        "train_args": TRAIN_ARGS, "setup_seconds": round(setup_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "work_dir": work if args.work_dir else None,
        "results": results,
    }
    print(table(results))
    print(f"\n{summary['device']}, torch {summary['torch']}; {args.n_train} training images "
          f"({setup['n_train_captions']} captions), {args.n_val} validation images; setup "
          f"{summary['setup_seconds']:.0f} s, total {summary['total_seconds']:.0f} s")
    if args.out_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)
        with open(args.out_json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    if not args.work_dir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
