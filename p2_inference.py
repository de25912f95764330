"""Problem 2: caption every image in a folder with the trained captioner.

    python3 p2_inference.py IMG_DIR OUT_JSON DECODER_WEIGHTS

Writes `{"<file name without its last extension>": "caption", ...}` for every
file in IMG_DIR that Pillow can read (`photo.v2.JPEG` -> `photo.v2`); other
files are skipped with a warning naming them. DECODER_WEIGHTS is the course's
`decoder_model.bin`. The checkpoint describes its own architecture, encoder
and decoding settings, so there are no model options.

Environment (the graders' command line is fixed, so options live here):
  HW3_P2_CKPT             the checkpoint (default `<cache>/p2_checkpoint.pt`,
                          filled by `bash hw3_download.sh`)
  HW3_P2_ENCODER_WEIGHTS  a local file with the encoder's weights (default: the
                          cache, `encoder.cached_weights_path`)
  HW3_P2_BEAM, HW3_P2_MAX_LEN, HW3_P2_LENGTH_PENALTY
                          override the checkpoint's decoding settings
  HW3_P2_BATCH            images per batch (default 32)
  HW3_CACHE               root of the cache (default `<repo>/cache`)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

import io_utils
from captioner import autocast, load_checkpoint
from tokenizer import BPETokenizer

CHECKPOINT_NAME = "p2_checkpoint.pt"
DEFAULT_BATCH = 32


def default_checkpoint() -> str:
    """Where hw3_download.sh puts the trained checkpoint."""
    return io_utils.cache_dir(CHECKPOINT_NAME)


def checkpoint_path() -> str:
    path = os.environ.get("HW3_P2_CKPT") or default_checkpoint()
    if not os.path.isfile(path):
        raise SystemExit(f"error: no captioner checkpoint at {path!r}. Fetch the submitted one with "
                         "`bash hw3_download.sh`, or train one with `python3 p2_train.py ... --out FILE` "
                         "and set HW3_P2_CKPT=FILE")
    return path


def generation_overrides() -> dict:
    """Decoding settings from the environment; None keeps the checkpoint's."""
    number = io_utils.env_number
    return {
        "beam_size": number("HW3_P2_BEAM", int, lambda v: v >= 1, "a positive integer"),
        "max_len": number("HW3_P2_MAX_LEN", int, lambda v: v >= 1, "a positive integer"),
        "length_penalty": number("HW3_P2_LENGTH_PENALTY", float, lambda v: 0 <= v < math.inf, "a number >= 0"),
    }


def image_keys(folder: str, names: list) -> dict:
    """File name -> output key; exits naming both files when two images share a key."""
    groups = {}
    for name in names:
        groups.setdefault(io_utils.strip_extension(name), []).append(name)
    for key, group in groups.items():
        images = [n for n in group if io_utils.is_image(os.path.join(folder, n))] if len(group) > 1 else group
        if len(images) > 1:
            raise SystemExit(f"error: images {' and '.join(map(repr, images))} in {folder!r} would both be "
                             f"captioned as {key!r}; the output holds one caption per name without extension")
    return {name: io_utils.strip_extension(name) for name in names}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("img_dir", help="folder of images (any names, any Pillow-readable format)")
    parser.add_argument("out_json", help="output JSON (its folder is created)")
    parser.add_argument("decoder_weights", help="the course's decoder_model.bin (GPT-2)")
    args = parser.parse_args(argv)

    # Every cheap check first, so a bad argument fails before the models load.
    overrides = generation_overrides()
    batch_size = io_utils.env_number("HW3_P2_BATCH", int, lambda v: v >= 1, "a positive integer", DEFAULT_BATCH)
    checkpoint = checkpoint_path()
    if not os.path.isfile(args.decoder_weights):
        raise SystemExit(f"error: decoder weights {args.decoder_weights!r} do not exist (the course's decoder_model.bin)")
    if os.path.isdir(args.out_json):
        raise SystemExit(f"error: output path {args.out_json!r} is a folder, expected a file name")
    names = io_utils.list_files(args.img_dir)
    keys = image_keys(args.img_dir, names)
    tokenizer = BPETokenizer()

    device = io_utils.pick_device()
    try:
        model = load_checkpoint(checkpoint, args.decoder_weights, os.environ.get("HW3_P2_ENCODER_WEIGHTS") or None)
    # torch.load and the layout checks fail in many ways (pickle, zip, ValueError, missing file) on a wrong file.
    except Exception as error:  # noqa: BLE001
        raise SystemExit(f"error: cannot build the captioner from {checkpoint!r} and {args.decoder_weights!r}: {error}")
    model.to(device)

    paths = [os.path.join(args.img_dir, n) for n in names]
    results = {}
    batches = io_utils.readable_batches(paths, [model.encoder.transform], batch_size, device, "captions")
    with torch.no_grad():
        for indices, (images,) in batches:
            batch_names = [names[i] for i in indices]
            with autocast(device):
                feats = model.encode(images.to(device, non_blocking=True))  # [B, S, W]
                texts = model.captions(feats, tokenizer, batch_names, **overrides)
            results.update((keys[name], text) for name, text in zip(batch_names, texts))
    if not results:
        raise SystemExit(f"error: no readable image in {args.img_dir!r} ({len(names)} files, none an image)")

    io_utils.atomic_write_text(args.out_json, json.dumps(results, ensure_ascii=False, indent=2, sort_keys=True) + "\n")
    print(f"wrote {len(results)} captions to {args.out_json} ({len(names) - len(results)} files skipped; "
          f"{device.type})", file=sys.stderr)


if __name__ == "__main__":
    main()
