"""What one beam-search step costs, by operation, on this machine (issue 23).

Builds the full-size decoder (GPT-2 small with cross-attention to 257 ViT-L/14 image tokens of
width 1024, the adapter preset), every parameter drawn from a seeded normal so that no block is
inert (a fresh cross-attention block adds nothing), and random image tokens for IMAGES images.
Then, in this process, eager (`decoder.BeamSearch` without a CUDA graph):

  search   one whole batched beam search, timed, with its captions' SHA-256 (equal hashes: equal
           captions, token for token); on CUDA also with the step captured as a CUDA graph (the
           capture included, then replayed warm), whose captions must equal the eager ones;
  profile  STEPS further steps under torch.profiler: the operations that took the most time,
           with their input shapes, per step.

`--decoder FILE` measures another copy of decoder.py (e.g. an earlier commit's: `git show
COMMIT:decoder.py > old.py`); `--compare FILE` also times FILE's search on the same weights and
image tokens in this process and says whether its captions equal the measured decoder's.

    python3 bench/bench_decode.py [--images 16] [--device cpu] [--decoder FILE] [--compare FILE] [--out-json FILE]
"""
import argparse
import hashlib
import importlib.util
import json
import os
import platform
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from captioner import GENERATION, PEFT_PRESETS, autocast  # noqa: E402
from file_io import atomic_write_text  # noqa: E402
from tokenizer import EOT_ID  # noqa: E402

ENCODER_WIDTH, IMAGE_TOKENS = 1024, 257  # timm's ViT-L/14 CLIP tower at 224 pixels


def load_decoder_module(path: str, name: str = "decoder_under_test"):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def build(module, device) -> "torch.nn.Module":
    torch.manual_seed(0)
    decoder = module.Decoder(module.DecoderConfig(**module.GPT2_SMALL, encoder_width=ENCODER_WIDTH,
                                                  **PEFT_PRESETS["adapter"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(decoder.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=generator) * (0.02 if p.dim() > 1 else 0.1))
            p.requires_grad_(False)
    return decoder.eval().to(device)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_search(module, decoder, feats, device) -> tuple:
    """One eager batched beam search of `module`'s BeamSearch: (seconds, steps, captions)."""
    K, T, lp = GENERATION["beam_size"], GENERATION["max_len"], GENERATION["length_penalty"]
    module.BeamSearch(decoder, feats[:1], K, 2, EOT_ID, lp).run()  # warm-up: allocator, thread pools
    sync(device)
    start = time.perf_counter()
    search = module.BeamSearch(decoder, feats, K, T, EOT_ID, lp)
    captions = search.run()
    sync(device)
    return time.perf_counter() - start, int(search.t), captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="images decoded together (default 16)")
    parser.add_argument("--steps", type=int, default=3, help="steps profiled after the search (default 3)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu; fp16 autocast on cuda)")
    parser.add_argument("--decoder", default=os.path.join(REPO, "decoder.py"),
                        help="the decoder.py to measure (default: this repository's)")
    parser.add_argument("--compare", metavar="FILE",
                        help="another decoder.py (e.g. an earlier commit's) to time on the same weights and "
                             "image tokens, its captions compared (default: none)")
    parser.add_argument("--top", type=int, default=10, help="operations listed (default 10)")
    parser.add_argument("--out-json", help="also write the numbers here (default: printed only)")
    args = parser.parse_args()
    device = torch.device(args.device)
    module = load_decoder_module(os.path.abspath(args.decoder))
    decoder = build(module, device)
    feats = torch.randn(args.images, IMAGE_TOKENS, ENCODER_WIDTH, generator=torch.Generator().manual_seed(2)).to(device)
    K, T, lp = GENERATION["beam_size"], GENERATION["max_len"], GENERATION["length_penalty"]

    with torch.no_grad(), autocast(device):
        seconds, steps, captions = timed_search(module, decoder, feats, device)
        graph = {}
        if device.type == "cuda":  # the graders' path: the step captured once, then replayed
            for run in ("graph_capture_s", "graph_warm_s"):
                sync(device)
                start = time.perf_counter()
                replayed = decoder.beam_search(feats, K, T, EOT_ID, lp, cuda_graph=True)
                sync(device)
                graph[run] = round(time.perf_counter() - start, 3)
            graph["graph_captured"] = getattr(decoder, "_graph_search", None) is not None  # else eager twice
            graph["graph_equals_eager"] = replayed == captions
        from torch.profiler import ProfilerActivity, profile

        search = module.BeamSearch(decoder, feats, K, T, EOT_ID, lp)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities, record_shapes=True) as prof:
            for _ in range(args.steps):
                search.step()
            sync(device)
        del search
        compared = {}
        if args.compare:
            other = load_decoder_module(os.path.abspath(args.compare), "decoder_compared")
            other_seconds, other_steps, other_captions = timed_search(other, build(other, device), feats, device)
            compared = {"compare": {"decoder": os.path.abspath(args.compare), "search_s": round(other_seconds, 3),
                                    "per_step_ms": round(1000 * other_seconds / max(other_steps, 1), 1),
                                    "captions_equal": other_captions == captions}}

    def self_ms(event) -> float:
        """Time spent in the operation itself, on the GPU for CUDA (`self_cuda_time_total` before torch 2.4)."""
        if device.type != "cuda":
            return event.self_cpu_time_total / 1000
        return (getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0)) / 1000

    events = [e for e in prof.key_averages(group_by_input_shape=True) if self_ms(e) > 0]
    top = sorted(events, key=lambda e: -self_ms(e))[:args.top]
    result = {
        "decoder": os.path.relpath(os.path.abspath(args.decoder), REPO),
        "images": args.images, "beams": K, "max_len": T, "steps": steps,
        "search_s": round(seconds, 3), "per_step_ms": round(1000 * seconds / max(steps, 1), 1),
        "captions_sha256": hashlib.sha256(json.dumps(captions).encode()).hexdigest()[:16],
        **graph,
        **compared,
        "profiled_step_ms": round(sum(map(self_ms, events)) / args.steps, 1),
        "top_ops": [{"op": e.key, "ms_per_step": round(self_ms(e) / args.steps, 2),
                     "calls_per_step": e.count // args.steps, "shapes": str(e.input_shapes)[:120]} for e in top],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    if args.out_json:
        atomic_write_text(args.out_json, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
