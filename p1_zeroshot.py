"""Problem 1: zero-shot image classification with OpenAI CLIP (no fine-tuning).

    python3 p1_zeroshot.py IMG_DIR ID2LABEL_JSON OUT_CSV

Writes `filename,label` for every readable image in IMG_DIR, label being the
integer class id (a key of ID2LABEL_JSON) whose text embedding the image is
most similar to. A file whose name is not valid UTF-8 gets no row: it is
skipped with a warning naming its bytes, since the CSV is UTF-8 text and one
row that is not would make the graders' pandas reject the whole file.

Default setup, and why: it is the strongest one that the rules (no
fine-tuning, free prompts) and the 10-minute limit on one RTX 2080 Ti allow.
- Two models, `ViT-L/14` and `ViT-L/14@336px`, their softmax probabilities
  averaged. ViT-L/14 is the largest OpenAI CLIP; the 336px variant sees the
  upscaled 32x32 images at a finer patch grid and errs differently.
- The 18 prompt templates that the CLIP repository lists for CIFAR-10/100
  (`data/prompts.md`); each class embedding is the normalised mean of its 18
  normalised prompt embeddings (the CLIP paper's prompt ensembling). The
  images are CIFAR-100-like, so these are the templates tuned for them.
- Horizontal-flip test-time augmentation: each image is encoded as is and
  mirrored, the two normalised embeddings averaged.
The best public result for this homework is 82.5% validation accuracy with
ViT-L/14 and these 18 templates. We have NOT measured our own accuracy: no
weights and no data can be fetched where this was written.

Environment (the graders' command line is fixed, so options live here):
  HW3_P1_CLIP   comma-separated CLIP model names (see clip.available_models())
                or paths to local CLIP weights files (a state_dict of
                clip.model.CLIP, or OpenAI's archive, read as data: no file
                runs code); default "ViT-L/14,ViT-L/14@336px"
  HW3_P1_BATCH  images per batch (default: on CUDA as many as half the free
                GPU memory holds for the largest model, flip included, at
                most 64; on the CPU 64)
  HW3_P1_PROFILE  a JSON file to write the run's time per phase to (load, text,
                read, encode, write; on CUDA each phase is synchronised, so the
                profile costs a little; default: none written)
  HW3_CACHE     root of the weight cache; CLIP weights live in $HW3_CACHE/clip
                (default <repo>/cache/clip, filled by `bash hw3_download.sh`;
                hw3_1.sh runs offline, so a model missing there is an error)

Shapes: N images, K classes, T templates, D embedding width, R input size.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import re
import sys
from typing import TYPE_CHECKING

import clip_weights
import file_io
import image_io
import io_utils

if TYPE_CHECKING:  # torch and CLIP load in the functions that use them: `--help` answers at once
    import torch

DEFAULT_MODELS = "ViT-L/14,ViT-L/14@336px"
DEFAULT_BATCH = 64
BATCH = io_utils.Range(int, 1)  # $HW3_P1_BATCH: images per CLIP batch
# 64 images are 128 views with the flip, enough rows to keep a ViT-L's matrix products large; a larger
# batch delays the first, which one loader worker prepares alone (256: 6 s on an H200, bench/RESULTS.md).
MAX_CUDA_BATCH = 64
MEMORY_SHARE = 0.5  # of the free GPU memory, for the image batch's activations (`image_bytes`)
# Prompts per encode_text call: bounds activation memory, whatever K * T is.
TEXT_CHUNK = 256

# The CIFAR-10/100 templates of the CLIP repository (data/prompts.md).
TEMPLATES = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
]


# ---------------------------------------------------------------- inputs

class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _json_type(value) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def read_id2label(path: str) -> dict[int, str]:
    """`{"0": "bicycle", ...}` from `path` as {0: "bicycle", ...}, sorted by id.

    Raises InputError naming the file and the problem when the file is
    unreadable, not JSON, not a non-empty object, or has a key that is not a
    non-negative integer or a value that is not a non-empty string.
    """
    # missing, a folder, not UTF-8, not JSON, nested too deeply, a lone surrogate: file_io's errors
    data = file_io.read_json(path, "id2label file", object_pairs_hook=_no_duplicate_keys)
    if not isinstance(data, dict):
        raise io_utils.InputError(f"id2label file {path!r} must hold a JSON object mapping class ids to names "
                                  f'(like {{"0": "bicycle"}}), found a JSON {_json_type(data)}')
    if not data:
        raise io_utils.InputError(f"id2label file {path!r} is an empty JSON object: no classes")
    id2label = {}
    for key, value in data.items():
        if not re.fullmatch(r"[0-9]+", key):
            raise io_utils.InputError(f"id2label file {path!r}: key {key!r} is not an integer class id")
        if not isinstance(value, str) or not value.strip():
            raise io_utils.InputError(f"id2label file {path!r}: the name of class {key!r} must be a non-empty "
                                      f"string, found {value!r}")
        if int(key) in id2label:
            raise io_utils.InputError(f"id2label file {path!r}: key {key!r} repeats class id {int(key)}")
        id2label[int(key)] = value
    id2label = dict(sorted(id2label.items()))
    _warn_same_prompt_names(path, id2label)
    return id2label


def _warn_same_prompt_names(path: str, id2label: dict) -> None:
    """Warn about ids whose names give the same prompts (CLIP's tokenizer lowercases;
    underscores and spaces are cleaned): the later ids' text embeddings equal the
    first one's, so argmax never picks them."""
    first = {}
    for class_id, name in id2label.items():
        key = clean_classname(name).lower()
        if key in first:
            io_utils.warn(f"id2label file {path!r}: class {class_id} ({name!r}) has the same prompts as class "
                          f"{first[key]} ({id2label[first[key]]!r}); class {class_id} can never be predicted")
        else:
            first[key] = class_id


def check_prompt_lengths(id2label: dict, templates) -> None:
    """Raise InputError naming the first class whose prompts exceed CLIP's 77-token context
    (clip.tokenize would raise only after the models have loaded)."""
    import clip

    for class_id, name in id2label.items():
        try:
            clip.tokenize([t.format(clean_classname(name)) for t in templates])
        except RuntimeError:
            shown = name if len(name) <= 60 else name[:60] + "..."
            raise io_utils.InputError(f"the name of class {class_id} ({len(name)} characters, {shown!r}) is too "
                                      "long: its prompts exceed CLIP's context of 77 tokens") from None


def clean_classname(name: str) -> str:
    """`maple_tree` -> `maple tree`: underscores become spaces, whitespace collapses."""
    return " ".join(name.replace("_", " ").split())


def model_specs(value: str | None = None) -> list[str]:
    """The CLIP models to ensemble: `value`, else $HW3_P1_CLIP, else the default.

    Each entry is checked before anything is loaded; an unknown name that is
    not a file either raises InputError with the list of known names, and so
    does a model given twice (by name, or as the same file by two paths): it
    would load twice and weigh double in the ensemble.
    """
    if value is None:
        value = os.environ.get("HW3_P1_CLIP") or DEFAULT_MODELS
    specs = [s.strip() for s in value.split(",") if s.strip()]
    if not specs:
        raise io_utils.InputError(f"no CLIP model given in {value!r}")
    seen = {}
    for spec in specs:
        clip_weights.check_spec(spec)
        same = os.path.realpath(spec) if os.path.isfile(spec) else spec
        if same in seen:
            raise io_utils.InputError(f"CLIP model {spec!r} is given twice in {value!r} (as {seen[same]!r} "
                                      "before); list each model of the ensemble once")
        seen[same] = spec
    return specs


def batch_size() -> int:
    """$HW3_P1_BATCH as a positive integer (default 64)."""
    return io_utils.env_number("HW3_P1_BATCH", BATCH, DEFAULT_BATCH)


def image_bytes(model, element_bytes: int = 2) -> int:
    """Activation memory one image takes in `model`'s image tower, itself and its mirror image:
    the input in fp32 and the model's dtype, and one block's activations at a time (the residual
    stream, its LayerNorm, the attention output and the 4x MLP: about 7 x tokens x width) plus
    the attention scores and their softmax (2 x heads x tokens^2)."""
    visual = model.visual
    R, patch, width = visual.input_resolution, visual.conv1.kernel_size[0], visual.conv1.out_channels
    tokens = (R // patch) ** 2 + 1
    heads = visual.transformer.resblocks[0].attn.num_heads
    one_view = 3 * R * R * (4 + element_bytes) + (7 * tokens * width + 2 * heads * tokens ** 2) * element_bytes
    return 2 * one_view


def image_batch(models, device) -> int:
    """Images per batch: $HW3_P1_BATCH, else on CUDA as many as MEMORY_SHARE of the free memory holds
    for the hungriest model (at most MAX_CUDA_BATCH), else DEFAULT_BATCH."""
    chosen = io_utils.env_number("HW3_P1_BATCH", BATCH)
    if chosen is not None or device.type != "cuda":
        return chosen or DEFAULT_BATCH
    per_image = max(image_bytes(model) for model, _ in models)
    return max(1, min(MAX_CUDA_BATCH, int(io_utils.free_cuda_memory(device) * MEMORY_SHARE) // per_image))


# ---------------------------------------------------------------- models

def load_clip(spec: str, device: torch.device):
    """(model, preprocess) for a CLIP model name (from the cache hw3_download.sh fills) or a local weights
    file, built from plain weights with no code run from any file (clip_weights.load_clip): fp16 on CUDA,
    fp32 on the CPU. A name missing from the cache is downloaded, with a notice, unless the run is offline
    (HF_HUB_OFFLINE, as hw3_1.sh sets it): then the error names hw3_download.sh."""
    return clip_weights.load_clip(spec, device)


def logit_scale(model) -> float:
    return float(model.logit_scale.detach().exp())


def text_embeddings(model, classnames, templates, device) -> torch.Tensor:
    """[K, D] class embeddings, fp32 on `device`: each class's prompts
    (templates filled with the cleaned name) encoded and L2-normalised,
    averaged over the templates, normalised again."""
    import clip
    import torch
    import torch.nn.functional as F

    prompts = [t.format(clean_classname(c)) for c in classnames for t in templates]  # K*T
    tokens = clip.tokenize(prompts).to(device)  # [K*T, 77]
    with torch.no_grad():
        chunks = [model.encode_text(tokens[i:i + TEXT_CHUNK]) for i in range(0, len(tokens), TEXT_CHUNK)]
    features = F.normalize(torch.cat(chunks).float(), dim=-1)  # [K*T, D]
    features = features.view(len(classnames), len(templates), -1)  # [K, T, D]
    return F.normalize(features.mean(dim=1), dim=-1)  # [K, D]


# ---------------------------------------------------------------- images

def _encode_with_flip(model, images: torch.Tensor) -> torch.Tensor:
    """[B, 3, R, R] -> [B, D]: mean of the normalised embeddings of the
    image and its mirror image, normalised. The mirror is taken on the
    preprocessed square tensor, which equals preprocessing the mirrored image."""
    import torch
    import torch.nn.functional as F

    both = torch.cat([images, images.flip(-1)]).to(model.dtype)  # [2B, 3, R, R]
    features = F.normalize(model.encode_image(both).float(), dim=-1)  # [2B, D]
    plain, mirrored = features.chunk(2)  # [B, D] each
    return F.normalize((plain + mirrored) / 2, dim=-1)


def image_embeddings(models, paths, device, batch_size, timer=None):
    """Encode every readable image in `paths` with every model, flip TTA included.

    models: [(model, preprocess), ...]. Returns (kept_paths, [[N, D] fp32 CPU
    tensor per model]), rows in the order of kept_paths; a file Pillow cannot
    read is skipped with a warning naming it. N may be 0 (tensors [0, 0]).
    The embeddings stay on the device until the end: no batch waits for the
    GPU to finish the last before it is queued. `timer` (an io_utils.PhaseTimer)
    counts waiting for images as "read" and the models' work as "encode".
    """
    import torch

    phase = timer or (lambda name: contextlib.nullcontext())
    kept, outputs = [], [[] for _ in models]
    transforms = [preprocess for _, preprocess in models]
    batches = iter(image_io.readable_batches(paths, transforms, batch_size, device, "CLIP"))
    with torch.no_grad():
        while True:
            with phase("read"):
                item = next(batches, None)
            if item is None:
                break
            indices, views = item
            kept.extend(paths[i] for i in indices)
            with phase("encode"):
                for (model, _), images, out in zip(models, views, outputs):
                    out.append(_encode_with_flip(model, images.to(device, non_blocking=True)))
    return kept, [torch.cat(out).cpu() if out else torch.empty(0, 0) for out in outputs]


def ensemble_probs(image_embs, text_embs, logit_scales) -> torch.Tensor:
    """[N, K] class probabilities: per model softmax(scale * img @ text.T),
    averaged over the models (each model's own temperature)."""
    import torch

    probs = [
        torch.softmax(scale * img.float().cpu() @ txt.float().cpu().t(), dim=-1)  # [N, K]
        for img, txt, scale in zip(image_embs, text_embs, logit_scales)
    ]
    return torch.stack(probs).mean(dim=0)


# ---------------------------------------------------------------- output

def predictions_csv(names, labels) -> str:
    """CSV text `filename,label`, rows sorted by file name, every name that holds `,`, `"`, `\r` or
    `\n` quoted, so that any legal file name reads back as itself.

    The csv module's minimal quoting only quotes for the characters of its own line end: with
    "\n" lines a name holding "\r" would go out bare, and pandas splits the row there. Such a
    row is written with every string quoted (QUOTE_NONNUMERIC: the label stays a bare integer).
    """
    buffer = io.StringIO()
    plain = csv.writer(buffer, lineterminator="\n")
    quoted = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
    plain.writerow(["filename", "label"])
    for name, label in sorted(zip(names, labels)):
        (quoted if "\r" in name else plain).writerow([name, label])
    return buffer.getvalue()


@io_utils.reports_input_errors
def main(argv=None) -> None:
    io_utils.quiet_known_warnings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__[__doc__.index("Environment ("):__doc__.index("\n\nShapes")])
    parser.add_argument("img_dir", help="folder of images (any names, any Pillow-readable format)")
    parser.add_argument("id2label", help='JSON object {"0": "class name", ...}')
    parser.add_argument("out_csv", help="output CSV (its folder is created)")
    args = parser.parse_args(argv)

    # Every cheap check first, so a bad argument fails before minutes of loading.
    id2label = read_id2label(args.id2label)
    check_prompt_lengths(id2label, TEMPLATES)
    specs = model_specs()
    batch_size()  # a bad $HW3_P1_BATCH fails here, before the models load
    profile_path = os.environ.get("HW3_P1_PROFILE") or None
    names = image_io.list_files(args.img_dir)
    file_io.check_outputs_spare_inputs({"OUT_CSV": args.out_csv, "HW3_P1_PROFILE": profile_path}, {
        "IMG_DIR": args.img_dir, "ID2LABEL": args.id2label,
        **{f"CLIP model {spec}": spec if os.path.isfile(spec) else clip_weights.cached_path(spec) for spec in specs}},
        reads_member=image_io.is_image)

    device = io_utils.pick_device()
    timer = io_utils.PhaseTimer(device, sync=profile_path is not None)
    class_ids = list(id2label)
    classnames = [id2label[i] for i in class_ids]
    with timer("load"):
        models = [load_clip(spec, device) for spec in specs]
    with timer("text"):
        text_embs = [text_embeddings(model, classnames, TEMPLATES, device) for model, _ in models]
    paths = [os.path.join(args.img_dir, name) for name in names]
    batch = image_batch(models, device)
    kept, image_embs = image_embeddings(models, paths, device, batch, timer)
    if not kept:
        raise io_utils.InputError(f"no readable image in {args.img_dir!r} ({len(names)} files, none an image)")

    with timer("write"):
        probs = ensemble_probs(image_embs, text_embs, [logit_scale(m) for m, _ in models])  # [N, K]
        labels = [class_ids[k] for k in probs.argmax(dim=1).tolist()]
        file_io.atomic_write_text(args.out_csv, predictions_csv([os.path.basename(p) for p in kept], labels))
    if profile_path:
        file_io.atomic_write_text(profile_path, timer.profile(images=len(kept), batch=batch, models=specs,
                                                              device=device.type))
    print(f"wrote {len(kept)} predictions to {args.out_csv} "
          f"({len(names) - len(kept)} files skipped; models {', '.join(specs)}; {device.type})",
          file=sys.stderr)


if __name__ == "__main__":
    main()
