"""A synthetic captioning set in the course's p2_data layout.

The real hw3_data cannot be downloaded here, so tests and benchmarks use this
stand-in to show that the captioner learns. `make_dataset(root)` writes

    root/images/{train,val}/*.jpg     simple shape scenes drawn with Pillow
    root/{train,val}.json             {"annotations": [{"caption", "image_id", "id"}],
                                       "images": [{"file_name", "id"}]}

with the quirks of the course's data: COCO-style names
(`000000060623.jpg`, id = the number) mixed with Flickr30k-style names
(`2988244398.jpg`, captions like " a red circle on the left ."), lowercase
captions, and a few grayscale or CMYK JPEGs. Every caption word is decided by
a visible attribute (shape, colour, size, position, background), so the set is
learnable. Everything is deterministic given the seed.

CLI: python3 synthetic.py OUT_DIR [--train N] [--val N] [--size S] [--seed S]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re

import numpy as np
from PIL import Image, ImageDraw

import io_utils

COLORS = {
    "red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220),
    "yellow": (240, 220, 30), "white": (245, 245, 245), "black": (15, 15, 15),
    "orange": (245, 140, 20), "purple": (140, 40, 170),
}
GRAY = (128, 128, 128)  # object colour in grayscale scenes, which say "gray"
SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = {"small": 0.14, "large": 0.21}  # radius as a fraction of the image side
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25),
             "bottom": (0.5, 0.75), "center": (0.5, 0.5)}
# Two objects sit at opposite positions, so even two large ones never overlap.
PAIRS = (("left", "right"), ("top", "bottom"))
WHERE = {"left": ("on the left", "on the left side of the image"),
         "right": ("on the right", "on the right side of the image"),
         "top": ("at the top", "at the top of the image"),
         "bottom": ("at the bottom", "at the bottom of the image"),
         "center": ("in the center", "in the middle of the image")}
REPORT_NAMES = ("bike.jpg", "girl.jpg", "sheep.jpg", "ski.jpg", "umbrella.jpg")
GRAY_FRACTION, CMYK_FRACTION = 0.04, 0.03


def random_scene(rng: np.random.Generator, mode: str = "RGB") -> dict:
    """A scene: background colour name, 1-2 objects, and the JPEG mode to save it in."""
    n_obj = int(rng.integers(1, 3))
    positions = [str(rng.choice(list(POSITIONS)))] if n_obj == 1 else list(PAIRS[rng.integers(2)])
    if n_obj == 2 and rng.random() < 0.5:
        positions.reverse()
    objects = []
    for pos in positions:
        color = "gray" if mode == "L" else str(rng.choice(list(COLORS)))
        objects.append({"shape": str(rng.choice(SHAPES)), "color": color,
                        "size": str(rng.choice(list(SIZES))), "position": pos})
    # Grayscale scenes keep only what survives the conversion: black or white behind gray.
    free = ["black", "white"] if mode == "L" else [c for c in COLORS if c not in {o["color"] for o in objects}]
    return {"background": str(rng.choice(free)), "objects": objects, "mode": mode}


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list:
    if shape == "triangle":
        angles = [-90, 30, 150]
        return [(cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a in angles]
    # star: ten corners alternating between the outer radius and 0.45 of it
    return [(cx + (r if k % 2 == 0 else 0.45 * r) * math.cos(math.radians(-90 + 36 * k)),
             cy + (r if k % 2 == 0 else 0.45 * r) * math.sin(math.radians(-90 + 36 * k))) for k in range(10)]


def draw_scene(scene: dict, size: int, rng: np.random.Generator) -> Image.Image:
    """Render a scene as an image of `scene["mode"]` (RGB, L or CMYK), size x size."""
    img = Image.new("RGB", (size, size), COLORS[scene["background"]])
    draw = ImageDraw.Draw(img)
    for obj in scene["objects"]:
        fill = GRAY if obj["color"] == "gray" else COLORS[obj["color"]]
        fx, fy = POSITIONS[obj["position"]]
        jx, jy = rng.uniform(-0.03, 0.03, size=2)  # small jitter, never enough to change the position word
        cx, cy, r = (fx + jx) * size, (fy + jy) * size, SIZES[obj["size"]] * size
        if obj["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj["shape"] == "square":
            h = 0.85 * r
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif obj["shape"] == "cross":
            w = 0.35 * r
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        else:
            draw.polygon(_shape_polygon(obj["shape"], cx, cy, r), fill=fill)
    return img.convert(scene["mode"])


def describe(scene: dict, k: int, rng: np.random.Generator) -> list:
    """k captions in different wordings (templates repeat only when k exceeds their number)."""
    bg = scene["background"]
    o = [dict(o, where=WHERE[o["position"]][int(rng.integers(2))]) for o in scene["objects"]]
    if len(o) == 1:
        a = o[0]
        templates = [
            f"a {a['color']} {a['shape']} {a['where']}",
            f"a {a['size']} {a['color']} {a['shape']} {WHERE[a['position']][1]}",
            f"there is a {a['color']} {a['shape']} on a {bg} background",
            f"a {a['size']} {a['color']} {a['shape']} on a {bg} background",
            f"a picture of a {a['color']} {a['shape']} {a['where']}",
            f"a {bg} image with a {a['size']} {a['color']} {a['shape']} {a['where']}",
            f"a {a['color']} {a['shape']}",
        ]
    else:
        a, b = o
        templates = [
            f"two shapes: a {a['color']} {a['shape']} and a {b['color']} {b['shape']}",
            f"a {a['color']} {a['shape']} {a['where']} and a {b['color']} {b['shape']} {b['where']}",
            (f"there is a {a['size']} {a['color']} {a['shape']} and a {b['size']} {b['color']} {b['shape']}"
             f" on a {bg} background"),
            f"a {a['color']} {a['shape']} and a {b['color']} {b['shape']} on a {bg} background",
            f"a {b['size']} {b['color']} {b['shape']} {b['where']} and a {a['size']} {a['color']} {a['shape']}",
            f"two shapes, a {b['color']} {b['shape']} and a {a['color']} {a['shape']}",
        ]
    order = rng.permutation(len(templates))
    return [re.sub(r"\ba ([aeiou])", r"an \1", templates[order[i % len(order)]]) for i in range(k)]


def _write_split(root, split, n, size, k, rng, used_ids, next_ann_id) -> tuple:
    folder = os.path.join(root, "images", split)
    os.makedirs(folder, exist_ok=True)
    styles = rng.permutation(["coco", "flickr"] * ((n + 1) // 2))[:n]
    special = rng.permutation(n)
    n_gray, n_cmyk = math.ceil(GRAY_FRACTION * n), math.ceil(CMYK_FRACTION * n)
    modes = ["RGB"] * n
    for i in special[:n_gray]:
        modes[i] = "L"
    for i in special[n_gray:n_gray + n_cmyk]:
        modes[i] = "CMYK"
    images, annotations, scenes = [], [], []
    for i in range(n):
        coco = styles[i] == "coco"
        while True:  # ids unique across both splits
            image_id = int(rng.integers(1, 600_000) if coco else rng.integers(10**9, 10**10))
            if image_id not in used_ids:
                used_ids.add(image_id)
                break
        file_name = f"{image_id:012d}.jpg" if coco else f"{image_id}.jpg"
        scene = dict(random_scene(rng, modes[i]), file_name=file_name, image_id=image_id)
        draw_scene(scene, size, rng).save(os.path.join(folder, file_name), quality=95)
        for text in describe(scene, k, rng):
            if coco:
                text = text + "." if rng.random() < 0.5 else text
            else:
                text = f" {text} ."
            annotations.append({"caption": text, "image_id": image_id, "id": next_ann_id})
            next_ann_id += 1
        images.append({"file_name": file_name, "id": image_id})
        scenes.append(scene)
    # The real files do not group captions by image; neither do we.
    annotations = [annotations[j] for j in rng.permutation(len(annotations))]
    json_path = os.path.join(root, f"{split}.json")
    with open(json_path, "w") as f:
        json.dump({"annotations": annotations, "images": images}, f)
    summary = {"json": json_path, "images_dir": folder, "n_images": n, "n_captions": len(annotations),
               "n_gray": modes.count("L"), "n_cmyk": modes.count("CMYK"), "scenes": scenes}
    return summary, next_ann_id


def make_dataset(root: str, n_train: int = 500, n_val: int = 100, image_size: int = 64,
                 seed: int = 0, captions_per_image: int = 5) -> dict:
    """Write the synthetic set under root; return counts, paths and each split's scene list."""
    if n_train < 0 or n_val < 0 or image_size < 16 or captions_per_image < 1:
        raise ValueError(f"need n_train, n_val >= 0, image_size >= 16, captions_per_image >= 1; got "
                         f"{n_train=}, {n_val=}, {image_size=}, {captions_per_image=}")
    rng = np.random.default_rng(seed)
    used_ids: set = set()
    train, next_id = _write_split(root, "train", n_train, image_size, captions_per_image, rng, used_ids, 1)
    val, _ = _write_split(root, "val", n_val, image_size, captions_per_image, rng, used_ids, next_id)
    return {"root": root, "image_size": image_size, "seed": seed, "train": train, "val": val}


def make_report_images(folder: str, size: int = 224, seed: int = 0) -> list:
    """Write the five p3_data file names (bike.jpg ... umbrella.jpg) as RGB synthetic scenes."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for name in REPORT_NAMES:
        path = os.path.join(folder, name)
        draw_scene(random_scene(rng), size, rng).save(path, quality=95)
        paths.append(path)
    return paths


def pretrain_caption_lm(captions: list, steps: int = 150, seed: int = 0, n_layer: int = 2,
                        n_embd: int = 128) -> dict:
    """A tiny GPT-2 taught the synthetic captions' language, the stand-in for GPT-2's
    pretraining (so that training the new modules has a language model to ground),
    returned as a state dict in the course's decoder_model.bin layout (`torch.save` it).

    It is decoder.py's own GPT-2 (no cross-attention), initialised as GPT-2 is (normal
    0.02, residual projections scaled by 1 / sqrt(2 L)), so it needs nothing beyond
    requirements.txt. Rows of the (tied) embedding for tokens the captions never use are
    zero, so their logits are exactly 0 and the full 50257-way softmax equals a softmax
    over the used tokens plus one logit of log(#unused): exact, and ~1000x cheaper.
    """
    import torch
    import torch.nn.functional as F

    from decoder import Decoder, DecoderConfig, gpt2_course_state, gpt2_shapes
    from p2_data import make_batch
    from tokenizer import EOT_ID

    torch.manual_seed(seed)
    shape = dict(n_layer=n_layer, n_embd=n_embd, vocab_size=50257, n_ctx=64)
    model = Decoder(DecoderConfig(**shape, encoder_width=n_embd, cross_layers=[]))
    gpt2 = gpt2_shapes(**shape)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in gpt2 or "ln_" in name:  # LayerNorms keep weight 1, bias 0
                continue
            if name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02)
    used = torch.tensor(sorted({t for c in captions for t in c} | {EOT_ID}))
    with torch.no_grad():
        keep = torch.zeros(50257, dtype=torch.bool)
        keep[used] = True
        model.wte.weight[~keep] = 0.0
    column = torch.full((50257,), -100, dtype=torch.long)
    column[used] = torch.arange(len(used))
    unused_logit = math.log(50257 - len(used))
    params = [p for name, p in model.named_parameters() if name in gpt2]
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(0, len(captions), (32,), generator=generator).tolist()
        inp, tgt = make_batch([captions[i] for i in batch])
        pos = torch.arange(inp.size(1))
        x = model.wte(inp) + model.wpe(pos)  # [B, T, C]
        for block in model.h:
            x = block(x, pos)[0]
        logits = model.ln_f(x) @ model.wte.weight[used].t()  # [B, T, used]
        logits = torch.cat([logits, torch.full_like(logits[..., :1], unused_logit)], dim=-1)
        target = torch.where(tgt >= 0, column[tgt.clamp(min=0)], tgt)
        F.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return gpt2_course_state(model.state_dict())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic captioning set in the p2_data layout.")
    parser.add_argument("out_dir", help="folder to write the set into (created)")
    # checked when parsed: make_dataset's own limits, a size bound that keeps a typo from asking for
    # gigabytes, and p2_train.py's seed range
    count, size, seed = io_utils.Range(int, 0), io_utils.Range(int, 16, 1024), io_utils.Range(int, 0, 2 ** 31 - 1)
    parser.add_argument("--train", type=count, default=500, help=f"training images, {count} (default %(default)s)")
    parser.add_argument("--val", type=count, default=100, help=f"validation images, {count} (default %(default)s)")
    parser.add_argument("--size", type=size, default=64, help=f"image side in pixels, {size} (default %(default)s)")
    parser.add_argument("--seed", type=seed, default=0, help=f"random seed, {seed} (default %(default)s)")
    args = parser.parse_args(argv)
    summary = make_dataset(args.out_dir, args.train, args.val, args.size, args.seed)
    for split in ("train", "val"):
        s = summary[split]
        print(f"{split}: {s['n_images']} images, {s['n_captions']} captions "
              f"({s['n_gray']} grayscale, {s['n_cmyk']} CMYK) -> {s['json']}")


if __name__ == "__main__":
    main()
