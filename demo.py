"""The embedded default behind `make demo`: course-layout data and tiny models, built here.

    python3 demo.py OUT_DIR [--train N] [--val N] [--p1-per-class N] [--size S] [--lm-steps N] [--lm-width W]
                      [--seed S]

Writes, with no download and no GPU (GPT-2's vocabulary excepted, found as the
tokenizer finds it):

  OUT_DIR/hw3_data/p1_data/val/{label}_{id}.png, p1_data/id2label.json
                     one shape per image, the label its shape (synthetic.py's drawing)
  OUT_DIR/hw3_data/p2_data/images/{train,val}/*.jpg, p2_data/{train,val}.json
                     the synthetic captioning set (synthetic.make_dataset)
  OUT_DIR/hw3_data/p2_data/decoder_model.bin
                     a tiny GPT-2 taught the captions' language, in the course's layout
                     (synthetic.pretrain_caption_lm)
  OUT_DIR/hw3_data/p3_data/images/{bike,girl,sheep,ski,umbrella}.jpg
  OUT_DIR/models/tiny_clip.pt
                     a random CLIP of OpenAI's architecture at toy size (Problem 1, CLIPScore)
  OUT_DIR/cache/timm/<DEMO_ENCODER>.pth
                     a random timm ViT, in the demo's own cache: the entry points find it with
                     HW3_CACHE=OUT_DIR/cache (`make demo` sets it); the user's cache is never written
  OUT_DIR/report_notes.md
                     the repository's notes, every section still empty saying it is a demo
  OUT_DIR/hw3_data/demo.json
                     the settings, written last (the Makefile's sign that the set is complete)

Every file is real: the entry points load them through their ordinary code paths.
The Makefile's `demo` target runs this, then the course workflow on OUT_DIR.

OUT_DIR must be new, hold no file, or be a demo's (OUT_DIR/.hw3_demo, written before
anything else, or an earlier demo's hw3_data/demo.json): the demo's files carry the
course's names (hw3_data/p2_data/train.json, report_notes.md), and a folder of real
data or the repository itself is refused before anything is written.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np

import file_io
import io_utils
import synthetic

# The demo's encoder: a timm ViT at toy size (32x32 input, 8x8 patches, width 64).
DEMO_ENCODER = "vit_tiny_patch16_224"
DEMO_ENCODER_KWARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)
MARKER = ".hw3_demo"  # in OUT_DIR: the demo may write there
P1_CLASSES = dict(enumerate(synthetic.SHAPES))  # id -> the shape drawn
EMPTY_SECTION = "(to be written after the results are in)"  # report_notes.md's placeholder
DEMO_ANSWER = ("Demo: the numbers and figures of this report come from synthetic shape images and tiny random "
               "models trained for a few dozen steps on a CPU; they show that every step of the workflow runs, "
               "not how well the homework's models do. In the real report, the student's answer stands here.")


def write_p1(folder: str, per_class: int, size: int, rng: np.random.Generator) -> None:
    """`{label}_{id}.png` images of one shape each, and id2label.json beside the folder."""
    val = os.path.join(folder, "val")
    os.makedirs(val, exist_ok=True)
    for label, shape in P1_CLASSES.items():
        for i in range(per_class):
            scene = synthetic.random_scene(rng)
            scene["objects"] = [dict(scene["objects"][0], shape=shape, position="center", size="large")]
            synthetic.draw_scene(scene, size, rng).save(os.path.join(val, f"{label}_{i}.png"))
    with open(os.path.join(folder, "id2label.json"), "w", encoding="utf-8") as f:
        json.dump({str(k): v for k, v in P1_CLASSES.items()}, f, indent=1)


def write_decoder(data_root: str, steps: int, width: int, seed: int) -> str:
    import torch

    from p2_data import normalize_caption
    from tokenizer import BPETokenizer

    tokenizer = BPETokenizer()
    with open(os.path.join(data_root, "train.json"), encoding="utf-8") as f:
        captions = [tokenizer.encode(normalize_caption(a["caption"])) for a in json.load(f)["annotations"]]
    path = os.path.join(data_root, "decoder_model.bin")
    torch.save(synthetic.pretrain_caption_lm(captions, steps=steps, seed=seed, n_embd=width), path)
    return path


def write_clip(path: str) -> None:
    import torch
    from clip.model import CLIP

    torch.manual_seed(0)
    model = CLIP(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                 context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                 transformer_layers=2)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(model.state_dict(), path)


def write_encoder(cache: str) -> str:
    """A random DEMO_ENCODER where the encoder looks for its weights under the cache root `cache`."""
    import timm
    import torch

    import encoder

    torch.manual_seed(0)
    path = encoder.cached_weights_path(DEMO_ENCODER, root=cache)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(timm.create_model(DEMO_ENCODER, pretrained=False, **DEMO_ENCODER_KWARGS).state_dict(), path)
    return path


def write_notes(template: str, path: str) -> None:
    """The report's free-text file with every section filled: the repository's notes
    (`template`), each section still empty given a line saying what the demo shows."""
    with open(template, encoding="utf-8") as f:
        text = f.read()
    filled = re.sub(r"^## Student\n\n.*?$", "## Student\n\nmake demo (no student)", text, count=1, flags=re.M)
    filled = filled.replace(EMPTY_SECTION, DEMO_ANSWER)
    with open(path, "w", encoding="utf-8") as f:
        f.write(filled)


def check_out_dir(out_dir: str) -> None:
    """InputError unless OUT_DIR is new, holds no file (empty folders only), or is a demo's (see the
    module's docstring): the demo would replace files of the course's names there."""
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise io_utils.InputError(f"demo folder {out_dir!r} is not a folder")
    if os.path.lexists(os.path.join(out_dir, MARKER)) or os.path.isfile(os.path.join(out_dir, "hw3_data", "demo.json")):
        return
    for root, folders, files in os.walk(out_dir):
        found = files + [f for f in folders if os.path.islink(os.path.join(root, f))]
        if found:
            raise io_utils.InputError(
                f"demo folder {out_dir!r} holds files the demo did not write (e.g. {os.path.join(root, found[0])!r}); "
                "the demo writes hw3_data/, models/ and report_notes.md with the course's names there: "
                "give a new or empty folder")


def build(out_dir: str, n_train: int, n_val: int, p1_per_class: int, size: int, lm_steps: int, lm_width: int,
          seed: int) -> None:
    data = os.path.join(out_dir, "hw3_data")
    p2 = os.path.join(data, "p2_data")
    notes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "report_notes.md")
    check_out_dir(out_dir)
    file_io.check_outputs_spare_inputs({"the demo's notes": os.path.join(out_dir, "report_notes.md")},
                                       {"the repository's notes": notes})
    os.makedirs(out_dir, exist_ok=True)
    file_io.atomic_write_text(os.path.join(out_dir, MARKER), "a folder demo.py writes into\n")
    steps = [
        ("Problem 1 images", lambda: write_p1(os.path.join(data, "p1_data"), p1_per_class, size,
                                              np.random.default_rng(seed))),
        ("captioning set", lambda: synthetic.make_dataset(p2, n_train, n_val, size, seed)),
        ("p3_data images", lambda: synthetic.make_report_images(os.path.join(data, "p3_data", "images"), 64, seed)),
        ("tiny GPT-2 (caption language)", lambda: write_decoder(p2, lm_steps, lm_width, seed)),
        ("tiny CLIP", lambda: write_clip(os.path.join(out_dir, "models", "tiny_clip.pt"))),
        ("tiny ViT", lambda: write_encoder(os.path.join(out_dir, "cache"))),
        ("report notes", lambda: write_notes(notes, os.path.join(out_dir, "report_notes.md"))),
    ]
    for i, (what, step) in enumerate(steps, 1):
        print(f"demo: [{i}/{len(steps)}] {what}", file=sys.stderr, flush=True)
        step()
    # written last: the Makefile's sign that the whole set is there
    settings = dict(train=n_train, val=n_val, p1_per_class=p1_per_class, size=size, lm_steps=lm_steps,
                    lm_width=lm_width, seed=seed, encoder=DEMO_ENCODER, encoder_kwargs=DEMO_ENCODER_KWARGS)
    file_io.atomic_write_text(os.path.join(data, "demo.json"), json.dumps(settings, indent=1) + "\n")


# The options' ranges, checked when parsed: synthetic.py draws on images of 16 pixels or more; the
# upper bounds keep a typo from asking for gigabytes; the seed is p2_train.py's range.
ONE_OR_MORE, STEPS = io_utils.Range(int, 1), io_utils.Range(int, 0)
SIZE, WIDTH = io_utils.Range(int, 16, 1024), io_utils.Range(int, 64, 1024)
SEED = io_utils.Range(int, 0, 2 ** 31 - 1)


@io_utils.reports_input_errors
def main(argv=None) -> None:
    io_utils.quiet_known_warnings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write into (created; the Makefile's demo/)")
    parser.add_argument("--train", type=ONE_OR_MORE, default=200,
                        help=f"captioning training images, {ONE_OR_MORE} (default %(default)s)")
    parser.add_argument("--val", type=ONE_OR_MORE, default=40,
                        help=f"captioning validation images, {ONE_OR_MORE} (default %(default)s)")
    parser.add_argument("--p1-per-class", type=ONE_OR_MORE, default=6,
                        help=f"Problem 1 images per class, {ONE_OR_MORE} (default %(default)s)")
    parser.add_argument("--size", type=SIZE, default=32, help=f"image side in pixels, {SIZE} (default %(default)s)")
    parser.add_argument("--lm-steps", type=STEPS, default=150,
                        help=f"optimiser steps teaching the tiny GPT-2 the captions, {STEPS} (default %(default)s)")
    parser.add_argument("--lm-width", type=WIDTH, default=64,
                        help=f"the tiny GPT-2's width in channels, {WIDTH} and a multiple of 64 (default %(default)s; "
                             "the 50257-way output dominates training)")
    parser.add_argument("--seed", type=SEED, default=0,
                        help=f"random seed of the images, captions and models, {SEED} (default %(default)s)")
    args = parser.parse_args(argv)
    if args.lm_width % 64:
        parser.error(f"argument --lm-width: expected a multiple of 64 (GPT-2's head width), got {args.lm_width}")
    build(args.out_dir, args.train, args.val, args.p1_per_class, args.size, args.lm_steps, args.lm_width, args.seed)


if __name__ == "__main__":
    main()
