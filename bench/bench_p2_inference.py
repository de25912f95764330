"""Speed of the graders' Problem 2 path, worst case, without any downloaded weight.

Builds the full-size captioner (timm ViT-L/14 CLIP tower + GPT-2 small with
the adapter preset) with random weights, saves it as the graders would get it
(checkpoint of trainable tensors, GPT-2 in the course's decoder_model.bin
layout, encoder weights file), writes N synthetic 224x224 JPEG scenes and
times `p2_inference.main` on them: loading, reading, encoding, batched beam
search with the key/value cache (beam 5), the JSON.

Worst case: <|endoftext|> is made unreachable, so every caption runs to the
checkpoint's max_len. Channel 0 of GPT-2's final LayerNorm is pinned to a
constant (weight 0, bias 100) and only <|endoftext|>'s output embedding reads
it (-100), which puts 10^4 below its logit; nothing else changes in cost.

The timed run (the first in this process: CUDA's start included) writes its
time per phase (load, read, encode, decode, text, write: p2_inference's
HW3_P2_PROFILE) into the result. Then, unless told otherwise:
- the same run with HW3_P2_CUDA_GRAPH=0 (eager decoding steps): its time, and
  whether its captions equal the CUDA-graph run's, image for image; then the
  CUDA-graph run once more, warm (`warm_seconds`);
- a new process's start-up, step by step (`startup_profile`);
- `bash hw3_2.sh` as the graders run it, in a process of its own: Python's
  start, the imports and the model load included;
- a naive decoder, as public solutions decode: one image at a time, beam 5,
  the whole prefix recomputed at every step (no cache), on a subset, and
  extrapolated to N. The speed-up is the naive estimate over our measured time.

    python3 bench/bench_p2_inference.py [--n-images 1404] [--naive-images 20] [--out-json FILE]
    python3 bench/bench_p2_inference.py --small      # toy models on the CPU: does it run?

The 2080 Ti estimate is the H100 time x 18 (fp16 tensor throughput, conservative); it
means little on any other device. The graders allow 40 minutes for hw3_2.sh.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import io_utils
import p2_inference
import synthetic
from captioner import (
    Captioner,
    autocast,
    load_checkpoint,
    make_config,
    mark_trainable,
    save_checkpoint,
)
from decoder import gpt2_course_state
from image_io import open_rgb
from tokenizer import EOT, EOT_ID, BPETokenizer

# A ViT and GPT-2 small enough for the CPU (the test suite's sizes).
SMALL_ENCODER = ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2})
SMALL_DECODER = {"n_layer": 2, "n_embd": 128, "adapter_dim": 16}
LIMIT_S = 40 * 60


def build_model(small: bool) -> Captioner:
    """Random captioner with GPT-2's initialisation (N(0, 0.02)) and <|endoftext|> unreachable."""
    config = (make_config("adapter", encoder=SMALL_ENCODER[0], encoder_kwargs=SMALL_ENCODER[1], **SMALL_DECODER)
              if small else make_config("adapter"))
    model = Captioner(config, decoder_weights=None, pretrained_encoder=False)
    with torch.no_grad():
        for param in model.decoder.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02)
        decoder = model.decoder
        decoder.ln_f.weight[0], decoder.ln_f.bias[0] = 0.0, 100.0
        decoder.wte.weight[:, 0] = 0.0
        decoder.wte.weight[EOT_ID, 0] = -100.0
    mark_trainable(model, verbose=False)
    return model


def save_as_graders_get_it(model: Captioner, folder: str) -> dict:
    """checkpoint, decoder_model.bin (course layout: Conv1D weights (in, out)) and encoder weights."""
    files = {name: os.path.join(folder, name) for name in ("checkpoint.pt", "decoder_model.bin", "encoder.pth")}
    save_checkpoint(model, files["checkpoint.pt"])
    torch.save(gpt2_course_state(model.decoder.state_dict()), files["decoder_model.bin"])
    torch.save({k: v.half() for k, v in model.encoder.vit.state_dict().items()}, files["encoder.pth"])
    return files


def ensure_vocab(folder: str) -> str:
    """GPT-2's vocabulary where the tokenizer finds it, else a stand-in of made-up words
    (same ids and size; decoding cost is negligible either way)."""
    try:
        BPETokenizer()
        return "GPT-2"
    except FileNotFoundError:
        pass
    words = {}
    for i in range(EOT_ID):
        word, n = "", i
        while True:
            word, n = chr(ord("a") + n % 26) + word, n // 26
            if n == 0:
                break
        words["\u0120" + word] = i  # \u0120 is GPT-2's byte table's space
    words[EOT] = EOT_ID
    with open(os.path.join(folder, "encoder.json"), "w", encoding="utf-8") as f:
        json.dump(words, f)
    with open(os.path.join(folder, "vocab.bpe"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    os.environ["HW3_BPE_DIR"] = folder
    return "stand-in (made-up words)"


def write_images(folder: str, n: int) -> list:
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        scene = synthetic.random_scene(rng)
        paths.append(os.path.join(folder, f"{i:012d}.jpg"))
        synthetic.draw_scene(scene, 224, rng).save(paths[-1], quality=90)
    return paths


@torch.no_grad()
def naive_beam_search(model: Captioner, feats: torch.Tensor, beam_size: int, max_len: int) -> list:
    """One image feats [1, S, W]; every step re-runs the decoder on all beams' whole prefix [K, t + 1]."""
    memory = model.decoder.memory(feats)  # K beams of one image share it (CrossAttention folds them)
    seqs = torch.full((1, 1), EOT_ID, dtype=torch.long, device=feats.device)  # [k, t + 1]
    scores = torch.zeros(1, device=feats.device)
    ended = []
    for t in range(max_len):
        logp = model.decoder(seqs, memory)[0][:, -1].float().log_softmax(-1)  # [k, V], no cache
        if t == 0:
            logp[:, EOT_ID] = float("-inf")
        top, idx = (scores[:, None] + logp).view(-1).topk(2 * beam_size)
        beam, tok = idx // logp.size(1), idx % logp.size(1)
        if (tok == EOT_ID).any():
            ended += [(float(top[i]), seqs[beam[i], 1:].tolist()) for i in (tok == EOT_ID).nonzero().squeeze(1).tolist()]
        keep = (tok != EOT_ID).nonzero().squeeze(1)[:beam_size]
        seqs = torch.cat([seqs[beam[keep]], tok[keep, None]], dim=1)
        scores = top[keep]
        if len(ended) >= beam_size:
            break
    ended += [(float(s), seq[1:].tolist()) for s, seq in zip(scores, seqs)]
    return max(ended)[1]


def time_naive(files: dict, paths: list, device: torch.device) -> tuple:
    model = load_checkpoint(files["checkpoint.pt"], files["decoder_model.bin"], files["encoder.pth"]).to(device)
    gen = model.config["generation"]
    lengths = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for path in paths:
        image = model.encoder.transform(open_rgb(path)).unsqueeze(0).to(device)
        with autocast(device):
            lengths.append(len(naive_beam_search(model, model.encode(image), gen["beam_size"], gen["max_len"])))
    sync()
    seconds = time.perf_counter() - start
    # the forcing works: our generate runs every caption to max_len too
    with autocast(device):
        image = torch.stack([model.encoder.transform(open_rgb(p)) for p in paths[:4]]).to(device)
        ours = model.generate(model.encode(image))
    assert all(len(ids) == gen["max_len"] for ids in ours) and set(lengths) == {gen["max_len"]}, (lengths, ours)
    return seconds, gen


# What a fresh process spends before p2_inference's own work: the interpreter, torch, timm (torchvision,
# and with it torch._dynamo on recent releases), CLIP's tokenizer, the CUDA context, cuBLAS.
STARTUP_PROBE = """
import json, sys, time
marks = [("start", time.perf_counter())]
def mark(name):
    marks.append((name, time.perf_counter()))
import torch; mark("import torch")
import p2_inference; mark("import p2_inference")
import timm; mark("import timm")
import clip_context; clip_context._tokenizer(); mark("CLIP tokenizer")
if torch.cuda.is_available():
    torch.zeros(1, device="cuda"); torch.cuda.synchronize(); mark("CUDA context")
    a = torch.randn(512, 512, device="cuda", dtype=torch.float16); (a @ a).sum().item(); mark("cuBLAS")
print(json.dumps({name: round(t - marks[i][1], 3) for i, (name, t) in enumerate(marks[1:])}))
"""


def startup_profile() -> dict:
    """Seconds per start-up step in a new process, and the bare interpreter's start."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    bare = time.perf_counter() - start
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", STARTUP_PROBE], cwd=REPO, check=True,
                            capture_output=True, text=True)
    return {"python": round(bare, 3), **json.loads(result.stdout.strip().splitlines()[-1])}


def run_in_process(images: str, out: str, files: dict, cuda: bool, graph: bool) -> tuple:
    """p2_inference.main on `images` with CUDA graphs on or off: (seconds, peak MB on CUDA, captions, profile)."""
    os.environ["HW3_P2_CUDA_GRAPH"] = "1" if graph else "0"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    p2_inference.main([images, out, files["decoder_model.bin"]])
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    with open(out, encoding="utf-8") as f:
        captions = json.load(f)
    with open(os.environ["HW3_P2_PROFILE"], encoding="utf-8") as f:
        profile = json.load(f)
    return seconds, round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None, captions, profile


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-images", type=int,
                        help="images to caption (default 1404, the private test set; 16 with --small)")
    parser.add_argument("--naive-images", type=int,
                        help="images for the naive decoder (default 20; 4 with --small; 0: skip it)")
    parser.add_argument("--small", action="store_true", help="toy-size models, to check that it runs")
    parser.add_argument("--no-eager", dest="eager", action="store_false",
                        help="skip the eager run (HW3_P2_CUDA_GRAPH=0) and its caption comparison")
    parser.add_argument("--no-process", dest="process", action="store_false",
                        help="skip timing `bash hw3_2.sh` in a process of its own")
    parser.add_argument("--out-json", help="also write the numbers here (default: printed only)")
    args = parser.parse_args()
    n_images = args.n_images or (16 if args.small else 1404)
    n_naive = min((4 if args.small else 20) if args.naive_images is None else args.naive_images, n_images)

    torch.manual_seed(0)
    device = io_utils.pick_device()
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="bench_p2_") as tmp:
        files = save_as_graders_get_it(build_model(args.small), tmp)
        vocab = ensure_vocab(tmp)
        paths = write_images(os.path.join(tmp, "images"), n_images)
        os.environ.update(HW3_P2_CKPT=files["checkpoint.pt"], HW3_P2_ENCODER_WEIGHTS=files["encoder.pth"],
                          HW3_P2_PROFILE=os.path.join(tmp, "profile.json"))
        out = os.path.join(tmp, "out", "pred.json")

        images = os.path.dirname(paths[0])
        seconds, peak_mb, captions, profile = run_in_process(images, out, files, cuda, graph=True)
        assert len(captions) == n_images
        extra = {}
        if args.eager:
            eager_seconds, _, eager, eager_profile = run_in_process(images, os.path.join(tmp, "out", "eager.json"),
                                                                    files, cuda, graph=False)
            warm_seconds, _, _, warm_profile = run_in_process(images, os.path.join(tmp, "out", "warm.json"), files,
                                                              cuda, graph=True)
            extra.update(eager_seconds=round(eager_seconds, 2), eager_profile=eager_profile["seconds"],
                         warm_seconds=round(warm_seconds, 2), warm_profile=warm_profile["seconds"],
                         graph_equals_eager=eager == captions,
                         graph_differs_from_eager=sorted(k for k in captions if captions[k] != eager.get(k))[:10])
        if args.process:
            extra["startup_profile"] = startup_profile()
            # its own profile: the process's time less its phases is the start-up (interpreter, imports)
            process_profile = os.path.join(tmp, "process_profile.json")
            start = time.perf_counter()
            subprocess.run(["bash", os.path.join(REPO, "hw3_2.sh"), images, os.path.join(tmp, "out", "process.json"),
                            files["decoder_model.bin"]], cwd=REPO, check=True, capture_output=True,
                           env={**os.environ, "HW3_P2_PROFILE": process_profile})
            extra["process_seconds"] = round(time.perf_counter() - start, 2)
            with open(process_profile, encoding="utf-8") as f:
                extra["process_profile"] = json.load(f)["seconds"]

        naive_seconds, gen = time_naive(files, paths[:n_naive], device) if n_naive else (None, profile["generation"])

    naive_total = naive_seconds * n_images / n_naive if n_naive else None
    result = {
        "n_images": n_images,
        "model": ("small test models" if args.small else
                  "timm ViT-L/14 CLIP tower + GPT-2 small, adapter preset (random weights)"),
        "generation": gen,
        "captions": f"all {gen['max_len']} tokens (<|endoftext|> unreachable)",
        "vocabulary": vocab,
        "seconds": round(seconds, 2),
        "seconds_note": "p2_inference.main in this process (imports done), model load included",
        "images_per_s": round(n_images / seconds, 1),
        "peak_gpu_mb": peak_mb,
        "profile": profile,
        **extra,
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "estimate_2080ti_s": round(seconds * 18, 1),
        "estimate_note": "H100 seconds x 18 (~989 / ~54 fp16 tensor TFLOPS); only meaningful when device is an H100",
        "limit_s": LIMIT_S,
        "naive_images": n_naive,
        "naive_seconds": naive_seconds and round(naive_seconds, 2),
        "naive_seconds_for_n_images": naive_total and round(naive_total, 1),
        "naive_estimate_2080ti_s": naive_total and round(naive_total * 18, 1),
        "speedup": naive_total and round(naive_total / seconds, 1),
        "speedup_note": "naive (one image at a time, no key/value cache, model load excluded) "
                        "over the whole p2_inference run (model load included)",
    }
    print(json.dumps(result, indent=2))
    if args.out_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)
        with open(args.out_json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
