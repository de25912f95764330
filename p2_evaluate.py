"""Score predicted captions the way the course's evaluator does: CIDEr and CLIPScore.

    python3 p2_evaluate.py --pred_file P --images_root DIR --annotation_file A

prints `CIDEr: x | CLIPScore: y` (and writes them as JSON with --metrics-out
FILE, for build_report.py). Same command line and same numbers as the
course's `p2_evaluate.py`:

- CIDEr is coco-caption's CIDEr-D through `pycocoevalcap`: the Java Stanford
  PTB tokenizer on references and predictions, then `Cider`, so document
  frequencies come from the evaluated set's references;
- CLIPScore is the mean over images of 2.5 * max(cos(image, caption), 0)
  with CLIP ViT-B/32 and CLIP's own preprocessing.

Where the course's script crashes, this one does not: a caption longer than
CLIP's 77-token context is truncated (with a warning), an image may have any
extension, and a missing image or a malformed file is reported by name.
Images are batched; fp16 on CUDA (as `clip.load` gives it), fp32 on CPU.

The training script imports `load_references`, `cider_pycoco` and
`clip_scores` from here.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections import Counter

from io_utils import atomic_write_text, cache_dir, open_rgb, strip_extension, warn

# Characters Java's PTB tokenizer takes as line breaks besides "\n" (which
# pycocoevalcap already replaces): left in a caption they shift every later
# caption onto the wrong image.
_LINE_BREAKS = re.compile("[\r\x0b\x0c\u2028\u2029]")


class InputError(ValueError):
    """A problem with the files or options given, reported to the user by name."""


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{what} {path!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{what} {path!r} is not valid JSON: {e}") from None


def load_references(annotation_file: str) -> dict[str, list[str]]:
    """Reference captions per image key from a course (COCO-style) annotation file.

    The key of an image is its `file_name` without the last extension; its
    captions are the `annotations` whose `image_id` is its `id`. Raises
    InputError naming the problem when the structure is not that.
    """
    data = _read_json(annotation_file, "annotation file")
    where = f"annotation file {annotation_file!r}"
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a JSON object with 'images' and 'annotations', "
                         f"got {type(data).__name__}")
    for field in ("images", "annotations"):
        if field not in data:
            raise InputError(f"{where}: missing the {field!r} list")
        if not isinstance(data[field], list):
            raise InputError(f"{where}: {field!r} must be a list, got {type(data[field]).__name__}")
    if not data["images"]:
        raise InputError(f"{where}: 'images' is empty")

    key_of_id = {}
    for i, image in enumerate(data["images"]):
        if (not isinstance(image, dict) or not isinstance(image.get("file_name"), str)
                or not isinstance(image.get("id"), (int, str))):
            raise InputError(f"{where}: images[{i}] must be an object with a string 'file_name' "
                             f"and an integer or string 'id', got {image!r}")
        if image["id"] in key_of_id:
            raise InputError(f"{where}: image id {image['id']!r} appears twice in 'images'")
        key_of_id[image["id"]] = strip_extension(image["file_name"])
    shared = sorted(k for k, n in Counter(key_of_id.values()).items() if n > 1)
    if shared:
        raise InputError(f"{where}: {len(shared)} name(s) without extension belong to several images, "
                         f"e.g. {shared[:5]}")

    refs = {key: [] for key in key_of_id.values()}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise InputError(f"{where}: annotations[{i}] must be an object with 'image_id' "
                             f"and a string 'caption', got {ann!r}")
        try:
            key = key_of_id[ann["image_id"]]
        except (KeyError, TypeError):
            raise InputError(f"{where}: annotations[{i}] refers to image_id {ann['image_id']!r}, "
                             "which is not in 'images'") from None
        refs[key].append(ann["caption"])
    empty = sorted(k for k, captions in refs.items() if not captions)
    if empty:
        raise InputError(f"{where}: {len(empty)} image(s) have no caption, e.g. {empty[:5]}")
    return refs


def load_predictions(pred_file: str) -> dict[str, str]:
    """The prediction file: a JSON object mapping image key to caption string."""
    data = _read_json(pred_file, "prediction file")
    if not isinstance(data, dict):
        raise InputError(f"prediction file {pred_file!r}: expected a JSON object {{image name: caption}}, "
                         f"got {type(data).__name__}")
    bad = [k for k, v in data.items() if not isinstance(v, str)]
    if bad:
        raise InputError(f"prediction file {pred_file!r}: {len(bad)} caption(s) are not strings, "
                         f"e.g. {bad[0]!r}: {data[bad[0]]!r}")
    return data


def check_keys(preds: dict, refs: dict) -> None:
    """Raise InputError unless the prediction keys are exactly the ground-truth keys."""
    missing = sorted(set(refs) - set(preds))
    extra = sorted(set(preds) - set(refs))
    if missing or extra:
        raise InputError(
            "prediction keys differ from the ground-truth keys: "
            f"{len(missing)} missing (e.g. {missing[:5]}), {len(extra)} extra (e.g. {extra[:5]})")


# ---------------------------------------------------------------------------
# CIDEr (coco-caption, Java tokenizer)
# ---------------------------------------------------------------------------


def check_java() -> None:
    if shutil.which("java") is None:
        raise InputError("CIDEr needs Java for coco-caption's PTB tokenizer and `java` is not on PATH; "
                         "install a JRE (e.g. `apt-get install default-jre-headless`) or pass --no-cider")


def cider_pycoco(preds: dict, refs: dict):
    """coco-caption's CIDEr-D of `preds` (key -> caption) against `refs` (key -> captions).

    Exactly the course's computation: pycocoevalcap's PTBTokenizer on both,
    then `Cider().compute_score`. Returns (mean, {key: score}).
    """
    check_java()
    check_keys(preds, refs)
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    keys = sorted(refs)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": _LINE_BREAKS.sub(" ", c)} for c in refs[k]] for k in keys})
    res = tokenizer.tokenize({k: [{"caption": _LINE_BREAKS.sub(" ", preds[k])}] for k in keys})
    # pycocoevalcap pairs the tokenizer's output lines with captions by position
    # and never checks the count; a shifted line would score silently wrong.
    if any(len(gts.get(k, ())) != len(refs[k]) or len(res.get(k, ())) != 1 for k in keys):
        raise RuntimeError("the PTB tokenizer returned a different number of lines than captions sent")
    mean, scores = Cider().compute_score(gts, res)
    return float(mean), {k: float(s) for k, s in zip(gts.keys(), scores)}


# ---------------------------------------------------------------------------
# CLIPScore
# ---------------------------------------------------------------------------


def find_images(images_root: str, keys) -> dict[str, str]:
    """Path of the image of each key: `<root>/<key>.<any extension>`.

    `<key>.jpg` (the course's path) wins when several files share the stem.
    Raises InputError naming the keys without an image.
    """
    if not os.path.isdir(images_root):
        raise InputError(f"image folder {images_root!r} does not exist or is not a folder")
    by_stem = {}
    for name in sorted(os.listdir(images_root)):
        if os.path.isfile(os.path.join(images_root, name)):
            by_stem.setdefault(strip_extension(name), []).append(name)
    paths, missing = {}, []
    for key in keys:
        names = by_stem.get(key)
        if not names:
            missing.append(key)
            continue
        name = key + ".jpg" if key + ".jpg" in names else names[0]
        paths[key] = os.path.join(images_root, name)
    if missing:
        missing.sort()
        raise InputError(f"no image in {images_root!r} for {len(missing)} key(s), "
                         f"e.g. {missing[0]!r} (looked for {missing[0]}.*); all: {missing[:5]}")
    return paths


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but torch sees no CUDA device")
    return device


def load_clip(model_name_or_file: str, device: str):
    """`clip.load` of an OpenAI model name (downloaded into the cache) or a local file."""
    import clip

    if model_name_or_file not in clip.available_models() and not os.path.isfile(model_name_or_file):
        raise InputError(f"CLIP model {model_name_or_file!r} not found; available models = "
                         f"{clip.available_models()}, or a path to a checkpoint file")
    return clip.load(model_name_or_file, device=device, jit=False, download_root=cache_dir("clip"))


def clip_text_tokens(texts: list[str], context_length: int):
    """CLIP token ids of `texts`, each cut to the context with a warning that counts them."""
    import clip
    import torch

    try:
        return clip.tokenize(texts, context_length=context_length)
    except RuntimeError:  # at least one text is too long; find out how many
        rows, cut = [], 0
        for text in texts:
            try:
                rows.append(clip.tokenize(text, context_length=context_length))
            except RuntimeError:
                rows.append(clip.tokenize(text, context_length=context_length, truncate=True))
                cut += 1
        warn(f"{cut} caption(s) longer than CLIP's {context_length}-token context were truncated for CLIPScore")
        return torch.cat(rows)


class _Images:
    """The images of a list of paths, preprocessed for CLIP (a torch Dataset)."""

    def __init__(self, keys: list[str], paths: dict[str, str], preprocess):
        self.keys, self.paths, self.preprocess = keys, paths, preprocess

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        path = self.paths[self.keys[i]]
        try:
            image = open_rgb(path)
        except OSError as e:
            raise InputError(f"cannot read the image of key {self.keys[i]!r} ({path}): {e}") from None
        return self.preprocess(image)


def clip_scores(preds: dict, images_root: str, model_name_or_file: str = "ViT-B/32",
                device: str = "auto", batch_size: int = 64, workers: int | None = None) -> dict[str, float]:
    """CLIPScore of each prediction: 2.5 * max(cos(image embedding, caption embedding), 0).

    preds: key -> caption; the image of key k is `<images_root>/<k>.<ext>`.
    Returns {key: score}; the course's CLIPScore is the mean of the values.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    keys = sorted(preds)
    paths = find_images(images_root, keys)
    device = resolve_device(device)
    model, preprocess = load_clip(model_name_or_file, device)
    model.eval()
    tokens = clip_text_tokens([preds[k] for k in keys], model.context_length)  # (N, 77)
    if workers is None:
        workers = min(4, os.cpu_count() or 1) if device == "cuda" else 0
    loader = DataLoader(_Images(keys, paths, preprocess), batch_size=batch_size,
                        shuffle=False, num_workers=workers)
    scores = []
    with torch.no_grad():
        for images in tqdm(loader, desc="CLIPScore", unit="batch", file=sys.stderr):
            start = len(scores)
            text = tokens[start:start + len(images)].to(device)  # (B, 77)
            image_emb = model.encode_image(images.to(device, model.dtype)).float()  # (B, D)
            text_emb = model.encode_text(text).float()  # (B, D)
            cos = F.cosine_similarity(image_emb, text_emb, dim=-1)  # (B,)
            scores += (2.5 * cos.clamp(min=0)).tolist()
    return dict(zip(keys, scores))


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pred_file", required=True, help="JSON {image name without extension: caption}")
    p.add_argument("--images_root", help="folder of the images (needed for CLIPScore)")
    p.add_argument("--annotation_file", required=True, help="course annotation JSON (images, annotations)")
    p.add_argument("--clip-model", default="ViT-B/32", help="CLIP model name or checkpoint file (default ViT-B/32)")
    p.add_argument("--per-image", metavar="FILE",
                   help="write a JSON list of {key, caption, clip_score[, cider]} sorted by CLIPScore, best first")
    p.add_argument("--metrics-out", metavar="FILE",
                   help="write the scores as JSON {cider, clipscore, n_images, pred_file, annotation_file} "
                        "(null for a skipped metric); build_report.py reads it")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="image loading processes (default 4 on CUDA, 0 on CPU)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-cider", action="store_true", help="skip CIDEr (and Java)")
    p.add_argument("--no-clipscore", action="store_true", help="skip CLIPScore (and CLIP)")
    args = p.parse_args(argv)
    if args.no_cider and args.no_clipscore:
        p.error("--no-cider and --no-clipscore leave nothing to compute")
    if not args.no_clipscore and not args.images_root:
        p.error("--images_root is required for CLIPScore (or pass --no-clipscore)")
    if args.per_image and args.no_clipscore:
        p.error("--per-image lists images by CLIPScore; drop --no-clipscore")
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        refs = load_references(args.annotation_file)
        preds = load_predictions(args.pred_file)
        check_keys(preds, refs)
        if not args.no_cider:
            check_java()
        if not args.no_clipscore:
            find_images(args.images_root, preds)  # fail before any slow work
        parts, cider, cider_mean, clip_mean = [], None, None, None
        if not args.no_cider:
            cider_mean, cider = cider_pycoco(preds, refs)
            parts.append(f"CIDEr: {cider_mean:.6f}")
        if not args.no_clipscore:
            clip = clip_scores(preds, args.images_root, args.clip_model, args.device, args.batch_size, args.workers)
            clip_mean = sum(clip.values()) / len(clip)
            parts.append(f"CLIPScore: {clip_mean:.6f}")
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    print(" | ".join(parts))
    if args.metrics_out:
        metrics = {"cider": cider_mean, "clipscore": clip_mean, "n_images": len(preds),
                   "pred_file": args.pred_file, "annotation_file": args.annotation_file}
        atomic_write_text(args.metrics_out, json.dumps(metrics, indent=2) + "\n")
    if args.per_image:
        rows = [{"key": k, "caption": preds[k], "clip_score": s} for k, s in clip.items()]
        if cider is not None:
            for row in rows:
                row["cider"] = cider[row["key"]]
        rows.sort(key=lambda r: (-r["clip_score"], r["key"]))
        atomic_write_text(args.per_image, json.dumps(rows, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
