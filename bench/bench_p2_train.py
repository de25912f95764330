"""Memory and speed of a full-size Problem 2 training step, without any downloaded weight.

Builds the full-size captioner (timm ViT-L/14 CLIP quickgelu tower + GPT-2
small, every PEFT preset) with random weights and runs p2_train's own
training step on made-up batches: `Learner.xe_step` (forward, loss, backward,
unscale, clip, AdamW step, GradScaler update, fp16 autocast) and
`Learner.scst_step`, on a Learner built around the model (no data, no run).
For each preset, with the feature cache (fp16 image tokens from disk, as
--cache-features gives them) and without it (images through the frozen ViT
every step):

  - peak GPU memory (allocated and reserved) over all steps, one of them with
    the longest training caption (57 BPE tokens in the course's train.json), under
    `torch.cuda.set_per_process_memory_fraction` set to 11 GB of the card,
    which is what a 2080 Ti offers; the target is at most 10 GiB;
  - the median step time over --steps steps after --warmup, on batches whose
    longest caption is 24 tokens (the p99 length: about the longest of 64);
  - the 2080 Ti epoch estimate: step time x 18 (fp16 tensor throughput) x steps per
    epoch (53,046 captions / batch size);
  - with the cache, the SCST step too (p2_train's --scst-batch-size images,
    --scst-samples captions each, made as p2_train's default makes them: the
    final beams; random weights hardly ever end a caption, so every caption
    runs to max_len: the worst case) and its epoch (10,604 images).

    python3 bench/bench_p2_train.py [--peft none adapter prefix lora] [--steps 20] [--out-json FILE]
    python3 bench/bench_p2_train.py --small      # toy models on the CPU: does it run?

Batch size, learning rate, clipping and the SCST sizes are p2_train's
defaults. As in p2_train, the whole model sits on the GPU with the cache too
(the frozen ViT-L's fp32 weights, about 1.2 GB, included). A step that fails
(out of memory, or any error in the SCST step) is recorded in the JSON and the
other settings still run. The 2080 Ti estimate means little unless the device
is an H100.
"""
import argparse
import copy
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import p2_train
from bench_p2_inference import SMALL_DECODER, SMALL_ENCODER, ensure_vocab
from captioner import PEFT_PRESETS, Captioner, make_config, mark_trainable
from cider import CiderD, tokenize
from p2_data import make_batch
from tokenizer import EOT_ID

DEFAULTS = p2_train.parse_args(["--print-params"])  # every p2_train option at its default
USABLE_BYTES = 11e9  # a 2080 Ti's memory
TARGET_GIB = 10.0
TRAIN_CAPTIONS, TRAIN_IMAGES = 53046, 10604  # the course's train.json
LONGEST_TOKENS, P99_TOKENS = 57, 24  # BPE tokens per training caption: max, 99th percentile
H100_TO_2080TI = 18  # ~989 / ~54 dense fp16 tensor TFLOPS, conservative


def build_model(peft: str, small: bool) -> Captioner:
    """Random captioner at full size (or the test suite's toy size), trainable groups marked."""
    # the toy GPT-2's shape only: its adapter_dim would add adapters to every preset
    shape = {k: SMALL_DECODER[k] for k in ("n_layer", "n_embd")}
    config = (make_config(peft, encoder=SMALL_ENCODER[0], encoder_kwargs=SMALL_ENCODER[1], **shape)
              if small else make_config(peft))
    model = Captioner(config, decoder_weights=None, pretrained_encoder=False)
    mark_trainable(model, verbose=False)
    return model


def bare_trainer(model: Captioner, device: torch.device, cached: bool, batch_size: int) -> p2_train.Learner:
    """A p2_train.Learner around `model` with p2_train's defaults and no data: it takes the steps
    on the batches given to it. `cache_features` only tells `Learner.features` that batches hold
    fp16 image tokens rather than images (and keeps the frozen ViT off the GPU, as p2_train does)."""
    args = copy.copy(DEFAULTS)
    args.batch_size = batch_size
    args.device = device.type
    args.cache_features = "(made-up features)" if cached else None
    learner = p2_train.Learner(model, device, args)
    learner.use_optimizer(args.lr, args.weight_decay)
    learner.steps_per_epoch = math.ceil(TRAIN_CAPTIONS / batch_size)
    return learner


def image_batch(model: Captioner, n: int, cached: bool, device: torch.device) -> torch.Tensor:
    """What the loader yields on the CPU: fp16 image tokens [n, S, W], or preprocessed images [n, 3, H, W]."""
    if cached:
        rows, cols = model.encoder.grid
        x = torch.randn(n, model.encoder.prefix_tokens + rows * cols, model.encoder.width).half()
    else:
        x = torch.randn(n, *model.encoder.data_config["input_size"])
    return x.pin_memory() if device.type == "cuda" else x


def caption_batch(n: int, longest: int, rng: np.random.Generator) -> tuple:
    """(input, target) [n, longest + 1]: one caption of `longest` tokens, the rest 8 to `longest`."""
    lengths = [longest] + rng.integers(8, longest + 1, n - 1).tolist()
    return make_batch([rng.integers(0, EOT_ID, k).tolist() for k in lengths])


def timed(step, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - start


def memory_gib(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


def measure_xe(trainer, model, cached: bool, args, device, rng) -> dict:
    """Peak memory (one step with the longest caption included) and median step time."""
    x = image_batch(model, args.batch_size, cached, device)
    longest = caption_batch(args.batch_size, LONGEST_TOKENS, rng)
    typical = caption_batch(args.batch_size, P99_TOKENS, rng)
    scale = trainer.scaler.get_scale() if trainer.amp else None
    for _ in range(args.warmup):
        trainer.xe_step(x, *typical, lr=trainer.args.lr)
    if not trainer.optimizer.state:  # AdamW allocates its moments at its first step that is not skipped
        raise RuntimeError("every warm-up step overflowed in fp16 and was skipped: AdamW holds no state yet, "
                           "so the memory peak would be too low; raise --warmup")
    trainer.xe_step(x, *longest, lr=trainer.args.lr)  # the memory peak: the longest caption with the optimizer's state allocated
    scales = [trainer.scaler.get_scale()] if trainer.amp else []
    times = []
    for _ in range(args.steps):
        times.append(timed(lambda: trainer.xe_step(x, *typical, lr=trainer.args.lr), device))
        scales += [trainer.scaler.get_scale()] if trainer.amp else []
    step_s = statistics.median(times)
    return {"step_s": round(step_s, 4), "step_s_min": round(min(times), 4), "step_s_max": round(max(times), 4),
            "caption_tokens": {"memory_step": LONGEST_TOKENS, "timed_steps": P99_TOKENS},
            # GradScaler halves its scale on every step it skips (inf/nan gradients): a skipped step is cheaper
            "skipped_timed_steps": sum(b < a for a, b in zip(scales, scales[1:])),
            "initial_scale": scale,
            "epoch_steps": trainer.steps_per_epoch,
            "epoch_2080ti_h": round(step_s * H100_TO_2080TI * trainer.steps_per_epoch / 3600, 2),
            **memory_gib(device)}


def measure_scst(trainer, model, args, device, rng) -> dict:
    """p2_train's SCST step as run() switches to it: a fresh AdamW at --scst-lr, CIDEr-D rewards."""
    n = trainer.args.scst_batch_size
    trainer.use_optimizer(trainer.args.scst_lr, 0.0)
    keys = [str(i) for i in range(n)]
    decode = trainer.tokenizer.decode
    refs = {k: [tokenize(decode(rng.integers(0, EOT_ID, 12).tolist())) for _ in range(5)] for k in keys}
    reward = CiderD(refs)
    x = image_batch(model, n, True, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        trainer.scst_step(x, keys, reward, trainer.args.scst_lr)
    times = [timed(lambda: trainer.scst_step(x, keys, reward, trainer.args.scst_lr), device) for _ in range(args.scst_steps)]
    step_s = statistics.median(times)
    epoch_steps = math.ceil(TRAIN_IMAGES / n)
    return {"scst_batch_size": n, "scst_samples": trainer.args.scst_samples,
            "max_len": trainer.model.config["generation"]["max_len"],
            "step_s": round(step_s, 4), "epoch_steps": epoch_steps,
            "epoch_2080ti_h": round(step_s * H100_TO_2080TI * epoch_steps / 3600, 2), **memory_gib(device)}


def measure(peft: str, args, device) -> list:
    """Both settings for one preset on one model (built once: a random ViT-L takes a while to initialise),
    each with its own fresh optimizer and scaler."""
    torch.manual_seed(0)
    model = build_model(peft, args.small)
    results = []
    for cached in (True, False):
        start = time.perf_counter()
        result = {"peft": peft, "feature_cache": cached}
        rng = np.random.default_rng(0)
        trainer = None
        try:
            trainer = bare_trainer(model, device, cached, args.batch_size)
            if args.small:  # the SCST step at toy size too: two images, two samples each
                trainer.args.scst_batch_size, trainer.args.scst_samples = 2, 2
            result["trainable_params"] = sum(p.numel() for p in trainer.params)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            result["xe"] = measure_xe(trainer, model, cached, args, device, rng)
            if device.type == "cuda":
                result["xe"]["fits_target"] = result["xe"]["peak_reserved_gib"] <= TARGET_GIB
            if cached and args.scst_steps:
                try:
                    result["scst"] = measure_scst(trainer, model, args, device, rng)
                except RuntimeError as error:  # out of memory included; the cross-entropy numbers stand
                    result["scst"] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
                    print(f"{peft}: the SCST step failed: {result['scst']['error']}", file=sys.stderr)
        except torch.cuda.OutOfMemoryError as error:
            result["out_of_memory"] = str(error).split("\n")[0]
        finally:
            del trainer  # its optimizer state and gradients, before the next setting's peak is measured
            for p in model.parameters():
                p.grad = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(result)
        print(f"{peft}, {'with' if cached else 'without'} the feature cache: "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    return results


def table(results: list) -> str:
    rows = ["| PEFT | cache | trainable | peak alloc. GiB | peak reserved GiB | step s | 2080 Ti epoch h "
            "| SCST step s | SCST epoch h |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "out_of_memory" in r:
            rows.append(f"| {r['peft']} | {'yes' if r['feature_cache'] else 'no'} | | out of memory | | | | | |")
            continue
        xe, scst = r["xe"], r.get("scst", {})
        if "error" in scst:
            scst = {"step_s": "failed", "epoch_2080ti_h": "(see JSON)"}
        rows.append(f"| {r['peft']} | {'yes' if r['feature_cache'] else 'no'} | {r['trainable_params']:,} "
                    f"| {xe.get('peak_allocated_gib', '-')} | {xe.get('peak_reserved_gib', '-')} | {xe['step_s']} "
                    f"| {xe['epoch_2080ti_h']} | {scst.get('step_s', '-')} | {scst.get('epoch_2080ti_h', '-')} |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peft", nargs="+", choices=sorted(PEFT_PRESETS), default=list(PEFT_PRESETS),
                        help="PEFT presets to time (default: all)")
    parser.add_argument("--batch-size", type=int, help=f"captions per step (default p2_train's "
                                                       f"{DEFAULTS.batch_size}; 4 with --small)")
    parser.add_argument("--steps", type=int, help="timed steps per setting (default 20; 2 with --small)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 5; 1 with --small; at least 1)")
    parser.add_argument("--scst-steps", type=int, help="timed SCST steps (default 5; 1 with --small; 0: none)")
    parser.add_argument("--small", action="store_true", help="toy-size models on the CPU, to check that it runs")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: cpu with --small, else auto")
    parser.add_argument("--out-json", help="also write the numbers here (default: printed only)")
    args = parser.parse_args()
    small = args.small
    args.batch_size = args.batch_size or (4 if small else DEFAULTS.batch_size)
    args.steps = args.steps or (2 if small else 20)
    args.warmup = max(1, args.warmup if args.warmup is not None else (1 if small else 5))
    args.scst_steps = args.scst_steps if args.scst_steps is not None else (1 if small else 5)
    choice = args.device or ("cpu" if small else "auto")
    device = torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")

    info = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "device": "CPU"}
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, USABLE_BYTES / total)
        torch.cuda.set_per_process_memory_fraction(fraction)  # the current device (needs an index, or none)
        info.update(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    total_memory_gib=round(total / 2**30, 1), memory_fraction=round(fraction, 4),
                    usable_gib=round(fraction * total / 2**30, 2))
    with tempfile.TemporaryDirectory(prefix="bench_p2_train_") as tmp:
        info["vocabulary"] = ensure_vocab(tmp)
        results = [r for peft in args.peft for r in measure(peft, args, device)]

    summary = {
        **info,
        "model": ("small test models" if small else
                  "timm ViT-L/14 CLIP quickgelu tower + GPT-2 small (random weights), cross-attention in every block"),
        "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
        "target_gib": TARGET_GIB, "estimate_note": f"H100 seconds x {H100_TO_2080TI} (fp16 tensor throughput); "
                                                   "only meaningful when the device is an H100",
        "results": results,
    }
    print(table(results))
    print(json.dumps(summary, indent=2))
    if args.out_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)
        with open(args.out_json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
