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
CLIP's 77-token context is cut at a word boundary (with a warning), an image may have any
extension, and a missing image or a malformed file is reported by name (a
caption holding a lone UTF-16 surrogate, `"\\ud800"`, which neither Java's nor
CLIP's tokenizer can encode, is refused naming the file and the key).
Where the course's script breaks or scores differently (line breaks inside
captions, "_UNK" in references, file names other than `<key>.jpg`, images
with transparency or 16-bit channels), this one does the robust thing and
warns, naming the keys: the graders would not reproduce the number. Every
input and output path is checked before any scoring starts.
Images are batched; fp16 on CUDA (as `clip.load` gives it), fp32 on CPU.

The caption file and the image folder are read by `io_utils` (load_references,
find_images); CLIPScore itself is `clipscore.py`, which training shares.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
from collections import Counter

from PIL import Image

import clip_weights
from clipscore import clip_scores, load_clip
from file_io import atomic_write_text, check_output_path, check_outputs_spare_inputs, load_references, read_json
from image_io import find_images, to_rgb
from io_utils import WORKERS, InputError, Range, pick_device, quiet_known_warnings, reports_input_errors, strip_extension, warn

# Characters Java's PTB tokenizer takes as line breaks besides "\n" (which
# pycocoevalcap already replaces): left in a caption they shift every later
# caption onto the wrong image.
_LINE_BREAKS = re.compile("[\r\x0b\x0c\u2028\u2029]")


# ---------------------------------------------------------------------------
# Inputs (the annotation file and the image folder: io_utils)
# ---------------------------------------------------------------------------


def load_predictions(pred_file: str) -> dict[str, str]:
    """The prediction file: a JSON object mapping image key to caption string.

    A key written twice keeps its last caption, as JSON readers do, with a
    warning naming it: which caption counts changes the score.
    """
    repeated = []

    def note_repeated_keys(pairs):
        # called innermost object first, so the top-level object's keys are the last written
        repeated[:] = [key for key, n in Counter(key for key, _ in pairs).items() if n > 1]
        return dict(pairs)

    data = read_json(pred_file, "prediction file", object_pairs_hook=note_repeated_keys)
    if not isinstance(data, dict):
        raise InputError(f"prediction file {pred_file!r}: expected a JSON object {{image name: caption}}, "
                         f"got {type(data).__name__}")
    if repeated:
        warn(f"prediction file {pred_file!r} holds {_listing(repeated)} more than once; the last caption "
             "of each counts, and the score changes with the one you meant")
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


def check_output_file(path: str, option: str) -> None:
    """Raise InputError, naming `option`, unless `path` can become a file (checked before any scoring)."""
    try:
        check_output_path(path)
    except InputError as error:
        raise InputError(f"{option}: {error}") from None


def _listing(keys) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - 10} more" if len(keys) > 10 else ""
    return f"{len(keys)} key(s) {keys[:10]}{more}"


# ---------------------------------------------------------------------------
# Where the course's scorer gives another number
# ---------------------------------------------------------------------------
# The course's p2_evaluate.py (language_evaluation's CocoEvaluator for CIDEr,
# its own loop for CLIPScore) agrees with this script to the bit on ordinary
# input. On the inputs below it breaks or differs while this script does the
# robust thing; each is a warning naming the keys, because the number printed
# here is then not the one the graders' scorer reproduces.


def line_break_keys(captions: dict) -> list:
    """Keys (of key -> list of captions) with a caption holding a line break Java splits at."""
    return sorted(k for k, texts in captions.items() if any(_LINE_BREAKS.search(t) for t in texts))


def unk_keys(refs: dict) -> list:
    """Keys whose references contain "_UNK", which CocoEvaluator rewrites as "_UNKNOWN" in references only."""
    return sorted(k for k, texts in refs.items() if any("_UNK" in t for t in texts))


def course_keys(annotation_file: str) -> dict:
    """{our key: the course's key} for the images the course keys differently.

    The course keys an image by its file name with every ".jpg" deleted
    (`a.png` stays `a.png`, `a.jpg.jpg` becomes `a`); ours drops the last
    extension, whatever it is.
    """
    names = (image["file_name"] for image in read_json(annotation_file, "annotation file")["images"])
    return {strip_extension(n): n.replace(".jpg", "") for n in names
            if n.replace(".jpg", "") != strip_extension(n)}


def converts_differently(path: str) -> bool:
    """Whether Pillow's `convert("RGB")` (the course's) gives other pixels than image_io.to_rgb (ours),
    i.e. the image has transparency or more than 8 bits per channel; True when it fails."""
    try:
        with Image.open(path) as image:
            if image.mode in ("1", "L", "RGB", "CMYK", "YCbCr"):
                return False  # to_rgb is convert("RGB") for these; the header suffices
            image.load()
            ours = to_rgb(image).tobytes()
            try:
                return image.convert("RGB").tobytes() != ours
            except Exception:  # noqa: BLE001 -- the course's conversion fails: its scorer crashes
                return True
    except Exception:  # noqa: BLE001 -- an unreadable image is reported by the CLIPScore pass
        return False


def warn_course_differences(preds: dict, refs: dict, annotation_file: str, image_paths: dict | None,
                            cider: bool = True) -> None:
    """Warn wherever the course's scorer would score these inputs differently, naming the keys.

    image_paths: key -> image file, when CLIPScore is computed; cider: whether CIDEr is.
    """
    because = "so the graders' {} will differ"
    line_breaks = (("predictions", line_break_keys({k: [v] for k, v in preds.items()})),
                   ("references", line_break_keys(refs))) if cider else ()
    for what, keys in line_breaks:
        if keys:
            warn(f"the {what} of {_listing(keys)} contain a line break other than \\n (\\r, \\x0b, \\x0c, "
                 "U+2028 or U+2029): the course's scorer (Java's PTB tokenizer) splits the line there and scores "
                 "every later caption against the wrong image; here it counts as a space, " + because.format("CIDEr"))
    keys = unk_keys(refs) if cider else []
    if keys:
        warn(f"the references of {_listing(keys)} contain '_UNK', which the course's scorer rewrites as "
             "'_UNKNOWN' in references only; here they are scored as written, " + because.format("CIDEr"))
    renamed = course_keys(annotation_file)
    if renamed:
        examples = ", ".join(f"{k!r} there {v!r}" for k, v in sorted(renamed.items())[:5])
        warn(f"the course's scorer keys an image by its file name with every '.jpg' deleted, not by the name less "
             f"its last extension: {len(renamed)} image(s) get another key there (here {examples}); "
             "it would not find these predictions")
    if image_paths is None:
        return
    keys = [k for k, path in image_paths.items() if os.path.basename(path) != k + ".jpg"]
    if keys:
        warn(f"the images of {_listing(keys)} are not named <key>.jpg: the course's scorer opens <key>.jpg "
             "only and fails on them; here each is found whatever its extension")
    keys = [k for k, path in image_paths.items() if converts_differently(path)]
    if keys:
        warn(f"the images of {_listing(keys)} have transparency or more than 8 bits per channel: the course's "
             "scorer converts them with Pillow's convert('RGB') (transparency dropped, 16-bit values clipped); "
             "here transparency is composited on white and 16-bit values rescaled, " + because.format("CLIPScore"))


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
# Command line
# ---------------------------------------------------------------------------


BATCH = Range(int, 1)  # checked when parsed


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pred_file", required=True, help="JSON {image name without extension: caption}")
    p.add_argument("--images_root", help="folder of the images (required unless --no-clipscore)")
    p.add_argument("--annotation_file", required=True, help="course annotation JSON (images, annotations)")
    p.add_argument("--clip-model", default="ViT-B/32", help="CLIP model name or checkpoint file (default ViT-B/32)")
    p.add_argument("--per-image", metavar="FILE",
                   help="write a JSON list of {key, caption, clip_score[, cider]} sorted by CLIPScore, best first "
                        "(default: not written)")
    p.add_argument("--metrics-out", metavar="FILE",
                   help="write the scores as JSON {cider, clipscore, n_images, pred_file, annotation_file} "
                        "(null for a skipped metric); build_report.py reads it (default: not written)")
    p.add_argument("--batch-size", type=BATCH, default=64, help=f"images per CLIP batch, {BATCH} (default %(default)s)")
    p.add_argument("--workers", type=WORKERS, default=None,
                   help=f"image loading processes, {WORKERS} (default: on CUDA every core but one, up to 12; 0 on CPU)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where CLIP runs (default %(default)s: CUDA when torch sees a GPU)")
    p.add_argument("--no-cider", action="store_true", help="skip CIDEr (and Java)")
    p.add_argument("--no-clipscore", action="store_true", help="skip CLIPScore (and CLIP)")
    args = p.parse_args(argv)
    if args.no_cider and args.no_clipscore:
        p.error("--no-cider and --no-clipscore leave nothing to compute")
    if not args.no_clipscore and not args.images_root:
        p.error("--images_root is required for CLIPScore (or pass --no-clipscore)")
    if args.per_image and args.no_clipscore:
        p.error("--per-image lists images by CLIPScore; drop --no-clipscore")
    return args


# How a metric fails on this machine or these inputs (Java, the PTB tokenizer's subprocess, an image
# that will not decode, CUDA out of memory): reported after the other metric is printed and saved.
METRIC_FAILURES = (ValueError, OSError, RuntimeError, subprocess.SubprocessError)


def _failure(error: Exception) -> str:
    """A metric's failure in one line: our own errors as they are, anything else with its type."""
    return str(error) if isinstance(error, InputError) else f"{type(error).__name__}: {error}"


@reports_input_errors
def main(argv=None) -> None:
    quiet_known_warnings()
    args = parse_args(argv)
    try:
        # every check before any slow work, CLIP loaded (or downloaded) included
        for path, option in ((args.metrics_out, "--metrics-out"), (args.per_image, "--per-image")):
            if path:
                check_output_file(path, option)
        refs = load_references(args.annotation_file)
        preds = load_predictions(args.pred_file)
        check_keys(preds, refs)
        if not args.no_cider:
            check_java()
        image_paths = clip_model = None
        if not args.no_clipscore:
            clip_weights.check_spec(args.clip_model)
            image_paths = find_images(args.images_root, preds)
        read = set(image_paths.values()) if image_paths else set()
        check_outputs_spare_inputs(
            {"--metrics-out": args.metrics_out, "--per-image": args.per_image},
            {"--pred_file": args.pred_file, "--annotation_file": args.annotation_file,
             "--images_root": args.images_root if image_paths else None,
             "--clip-model": None if args.no_clipscore else
             args.clip_model if os.path.isfile(args.clip_model) else clip_weights.cached_path(args.clip_model)},
            reads_member=lambda path: path in read)
        if not args.no_clipscore:
            device = pick_device(args.device)
            clip_model = load_clip(args.clip_model, device)
        warn_course_differences(preds, refs, args.annotation_file, image_paths, cider=not args.no_cider)
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    # one metric failing (Java, an image that will not decode) still prints and saves the other
    parts, failed, cider, cider_mean, clip, clip_mean = [], [], None, None, None, None
    if not args.no_cider:
        try:
            cider_mean, cider = cider_pycoco(preds, refs)
            parts.append(f"CIDEr: {cider_mean:.6f}")
        except METRIC_FAILURES as error:
            failed.append(f"CIDEr failed: {_failure(error)}")
            parts.append("CIDEr: failed")
    if not args.no_clipscore:
        try:
            clip = clip_scores(preds, args.images_root, args.clip_model, device, args.batch_size, args.workers,
                               loaded=clip_model)
            clip_mean = sum(clip.values()) / len(clip)
            parts.append(f"CLIPScore: {clip_mean:.6f}")
        except METRIC_FAILURES as error:
            failed.append(f"CLIPScore failed: {_failure(error)}")
            parts.append("CLIPScore: failed")
    print(" | ".join(parts))
    if args.metrics_out and (cider_mean is not None or clip_mean is not None):
        metrics = {"cider": cider_mean, "clipscore": clip_mean, "n_images": len(preds),
                   "pred_file": args.pred_file, "annotation_file": args.annotation_file}
        atomic_write_text(args.metrics_out, json.dumps(metrics, indent=2) + "\n")
    if args.per_image and clip is not None:
        rows = [{"key": k, "caption": preds[k], "clip_score": s} for k, s in clip.items()]
        if cider is not None:
            for row in rows:
                row["cider"] = cider[row["key"]]
        rows.sort(key=lambda r: (-r["clip_score"], r["key"]))
        atomic_write_text(args.per_image, json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    if failed:
        saved = f" (the other metric is saved in {args.metrics_out})" if args.metrics_out and len(failed) < len(parts) \
            else ""
        raise SystemExit("error: " + "; ".join(failed) + saved)


if __name__ == "__main__":
    main()
