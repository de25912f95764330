"""Speed of the graders' Problem 1 path, without any downloaded weight.

Builds randomly initialised CLIP models with the exact ViT-L/14 and
ViT-L/14@336px architectures, saves them as state_dicts, writes N random
32x32 PNGs and times `p1_zeroshot.main` on them with HW3_P1_CLIP pointing at
the two files: reading, both preprocessings, both models with flip TTA,
the CSV. Random weights cost what real ones do; the accuracy is meaningless.

    python3 bench/bench_p1.py [--n-images 2500] [--out-json FILE]
    python3 bench/bench_p1.py --n-images 8 --small    # toy models: does it run?

The time includes loading the two checkpoints and CUDA start-up, as the
graders' run does; `process_seconds` is `bash hw3_1.sh` in a process of its
own (Python's start and the imports too; --no-process skips it). The 2080 Ti estimate is the H100 time x 18 (their fp16 tensor throughput,
conservative); it means little on any other device.
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
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import p1_zeroshot

# clip.model.CLIP arguments: (embed_dim, image_resolution, vision_layers,
# vision_width, vision_patch_size, context_length, vocab_size,
# transformer_width, transformer_heads, transformer_layers)
VIT_L14 = {"embed_dim": 768, "image_resolution": 224, "vision_layers": 24, "vision_width": 1024,
           "vision_patch_size": 14, "context_length": 77, "vocab_size": 49408,
           "transformer_width": 768, "transformer_heads": 12, "transformer_layers": 12}
SMALL = {"embed_dim": 64, "image_resolution": 32, "vision_layers": 2, "vision_width": 64,
         "vision_patch_size": 8, "context_length": 77, "vocab_size": 49408,
         "transformer_width": 64, "transformer_heads": 1, "transformer_layers": 2}
# CIFAR-100 fine labels, 50 of them, as the validation set's id2label holds.
CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
]


def save_model(config, path):
    """A random CLIP saved in fp16, the precision of OpenAI's released files."""
    # Imported here, after p1_zeroshot, which silences clip's import warning.
    from clip.model import CLIP

    model = CLIP(**config)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    return os.path.getsize(path)


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-images", type=int, default=2500, help="validation set size (2500)")
    parser.add_argument("--small", action="store_true", help="toy-size models, to check that it runs")
    parser.add_argument("--no-process", dest="process", action="store_false",
                        help="skip timing `bash hw3_1.sh` in a process of its own")
    parser.add_argument("--out-json", help="also write the numbers here (default: printed only)")
    args = parser.parse_args()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench_p1_") as tmp:
        base = SMALL if args.small else VIT_L14
        configs = {"ViT-L-14": base, "ViT-L-14-336px": {**base, "image_resolution": base["image_resolution"] * 3 // 2}}
        files, sizes = [], {}
        for name, config in configs.items():
            path = os.path.join(tmp, name + ".pt")
            sizes[name] = save_model(config, path)
            files.append(path)

        folder = os.path.join(tmp, "images")
        os.makedirs(folder)
        rng = np.random.default_rng(0)
        for i in range(args.n_images):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{CLASSES[i % 50]}_{i}.png"))
        id2label = os.path.join(tmp, "id2label.json")
        with open(id2label, "w") as f:
            json.dump({str(i): name for i, name in enumerate(CLASSES)}, f)

        os.environ["HW3_P1_CLIP"] = ",".join(files)
        os.environ["HW3_P1_PROFILE"] = os.path.join(tmp, "profile.json")
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        p1_zeroshot.main([folder, id2label, os.path.join(tmp, "out", "pred.csv")])
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        with open(os.path.join(tmp, "out", "pred.csv")) as f:
            rows = sum(1 for _ in f) - 1
        assert rows == args.n_images, f"{rows} rows for {args.n_images} images"
        profile = read_json(os.environ["HW3_P1_PROFILE"])
        process_seconds = process_profile = None
        if args.process:  # its own profile: the process's time less its phases is the start-up (imports)
            os.environ["HW3_P1_PROFILE"] = os.path.join(tmp, "process_profile.json")
            start = time.perf_counter()
            subprocess.run(["bash", os.path.join(REPO, "hw3_1.sh"), folder, id2label, os.path.join(tmp, "out", "p.csv")],
                           cwd=REPO, check=True, capture_output=True)
            process_seconds = round(time.perf_counter() - start, 2)
            process_profile = read_json(os.environ["HW3_P1_PROFILE"])

    result = {
        "n_images": args.n_images,
        "models": "small test models" if args.small else "ViT-L/14 + ViT-L/14@336px (random weights)",
        "checkpoint_mb": {k: round(v / 2**20, 1) for k, v in sizes.items()},
        "seconds": round(seconds, 2),
        "seconds_note": "p1_zeroshot.main in this process (imports done), model load included",
        "profile": profile,
        "process_seconds": process_seconds,
        "process_profile": process_profile,
        "images_per_s": round(args.n_images / seconds, 1),
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
        "estimate_2080ti_s": round(seconds * 18, 1),
        "estimate_note": "H100 seconds x 18 (~989 / ~54 fp16 tensor TFLOPS); only meaningful when device is an H100",
        "limit_s": 600,
    }
    print(json.dumps(result, indent=2))
    if args.out_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)
        with open(args.out_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
