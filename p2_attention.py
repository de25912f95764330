"""Problem 2 report: the decoder's cross-attention over the image, word by word.

    python3 p2_attention.py --images hw3_data/p3_data/images/*.jpg --out-dir outputs \\
        --decoder-weights hw3_data/p2_data/decoder_model.bin
    python3 p2_attention.py --per-image outputs/p2_per_image.json \\
        --images-root hw3_data/p2_data/images/val \\
        --out-dir outputs --decoder-weights hw3_data/p2_data/decoder_model.bin

The first command draws the five report images (bike, girl, sheep, ski,
umbrella) in one go: `--images` takes any number of files, so the shell's
glob `p3_data/images/*.jpg` is all it needs. The second draws the top-1 and
last-1 validation images by CLIPScore from the list that
`p2_evaluate.py --per-image FILE` writes. Each image is captioned with the
checkpoint's own decoding settings (beam search unless it says otherwise;
`--beam-size` overrides) and drawn as `OUT_DIR/attention_<stem>.png`
(`attention_top1_<key>.png`, `attention_last1_<key>.png`).
`OUT_DIR/attention.json` records, per stem, `{"caption", "tokens" (the panel
titles), "png"}`, and under `"top1"` / `"last1"` also the key, the scored
caption and its CLIPScore. Entries an earlier run wrote to the same JSON are
kept; this run's replace theirs.
The checkpoint is `--checkpoint`, else $HW3_P2_CKPT, else the cache (as for
p2_inference.py).

Which attention belongs to which word
-------------------------------------
The maps are the last cross-attention block's weights over the patch tokens
(class token dropped, heads averaged), read in one teacher-forced pass over
[<|endoftext|>, t1 .. tN, <|endoftext|>] (`Captioner.cross_attention`). The
decoder is causal, so the attention at position i is exactly the attention it
had while choosing token i + 1 during generation. A panel shows the attention
of the step that PRODUCED its word, as in the course's figure:

    panel 0        the image itself, titled <|endoftext|> (the start token is
                   given, not produced, so it has no map; the caption is the
                   figure's title);
    panel k        the k-th word: the attention at the positions that produced
                   its tokens, i.e. position k - 1 for a one-token word;
    last panel     <|endoftext|>: the attention at position N, the step that
                   produced the end token (the step after the last word when
                   the caption was cut at max_len: attention at a position
                   does not depend on what the step went on to choose).

The attention while reading the final <|endoftext|> (position N + 1) chose
nothing and is not shown. GPT-2's byte-level BPE splits some words into
several tokens (" skateboarding" -> " skate" "boarding"; "ramp." -> " ramp"
"."): a word starts at the first token, at a token beginning with whitespace,
or after a whitespace-only token (which belongs to no word). The tokens of a
word are one panel titled with the whole word, its map the mean of their
maps, so the panels are exactly the caption's whitespace-separated words.

Drawing: each map [rows, cols] is upsampled bilinearly to the image the
encoder sees (after its resize and centre crop, so the patches line up),
min-max normalised per panel (the colours say where, not how much) and laid
over the image with the jet colormap at alpha 0.5; COLUMNS panels a row.
Figures are drawn with matplotlib's Agg canvas directly, never shown.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

import image_io
import file_io
import io_utils
from tokenizer import EOT, BPETokenizer

# torch and the model load in the functions that use them: `--help` answers at once.

COLUMNS = 5
# Figure geometry in pixels at DPI, fixed so that every figure of n panels has the same size.
DPI = 100
PANEL_PX = 240  # one square panel
TITLE_PX = 30  # its title, above it
HEADER_PX = 50  # the caption, above the grid
MARGIN_PX = 6  # between panels
ALPHA = 0.5
EXTREMES = ("top1", "last1")


# ---------------------------------------------------------------------------
# Maps
# ---------------------------------------------------------------------------


def word_groups(tokenizer, ids: list) -> list:
    """Token ids -> [(word, [token positions in ids])]: whitespace-separated words, each
    the run of tokens from one starting with whitespace (or the first) to the next."""
    groups, boundary = [], True
    for pos, tid in enumerate(ids):
        piece = tokenizer.id_to_bytes[int(tid)]
        if not piece.strip():  # whitespace only: ends the word, belongs to none
            boundary = True
            continue
        if boundary or piece[:1].isspace():
            groups.append([])
        groups[-1].append(pos)
        boundary = piece[-1:].isspace()
    return [(tokenizer.decode([ids[p] for p in group]).strip(), group) for group in groups]


def model_view(image, transform):
    """The PIL image as the encoder sees it: the transform's steps before ToTensor
    (timm's eval transform: Resize, CenterCrop, ToTensor, Normalize)."""
    for step in getattr(transform, "transforms", ()):
        if "ToTensor" in type(step).__name__:
            break
        image = step(image)
    return image


def word_maps(model, tokenizer, image, device, beam_size: int | None = None):
    """Caption `image` (PIL, RGB) and return (caption, panels).

    panels: [(title, map)] -- ("<|endoftext|>", None) for the start, then one
    (word, float32 [rows, cols]) per caption word, then ("<|endoftext|>", map
    of the step that produced the end token). See the module docstring.
    """
    import torch

    from captioner import autocast, caption_text

    device = torch.device(device)
    x = model.encoder.transform(image).unsqueeze(0).to(device)  # [1, 3, H, W]
    with torch.no_grad(), autocast(device):
        feats = model.encode(x)  # [1, S, W]
        ids = [int(t) for t in model.generate(feats, beam_size=beam_size)[0]]
        att = model.cross_attention(feats, ids)  # [N + 2, rows, cols]
    att = att.float().cpu().numpy()
    assert att.shape[0] == len(ids) + 2, (att.shape, len(ids))
    panels = [(EOT, None)]
    # position p produced token p + 1, i.e. ids[p]: token position p's map is att[p]
    panels += [(word, att[positions].mean(0)) for word, positions in word_groups(tokenizer, ids)]
    panels.append((EOT, att[len(ids)]))
    return caption_text(tokenizer, ids), panels


# ---------------------------------------------------------------------------
# Figure
# ---------------------------------------------------------------------------


def figure_size(n_panels: int, columns: int = COLUMNS) -> tuple:
    """(width, height) in pixels of a figure of n_panels."""
    columns = max(1, min(columns, n_panels))
    rows = math.ceil(n_panels / columns)
    return columns * PANEL_PX, HEADER_PX + rows * (TITLE_PX + PANEL_PX)


def heat_map(att: np.ndarray, height: int, width: int) -> np.ndarray:
    """[rows, cols] attention -> [height, width] in [0, 1]: bilinear upsampling, then min-max."""
    import torch
    import torch.nn.functional as F

    grid = torch.from_numpy(np.ascontiguousarray(att, dtype=np.float32))[None, None]  # [1, 1, rows, cols]
    up = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()
    span = up.max() - up.min()
    return (up - up.min()) / span if span > 0 else np.zeros_like(up)


def draw_figure(image, caption: str, panels: list, path: str, columns: int = COLUMNS) -> str:
    """Draw the panels over `image` (PIL, as the encoder sees it) into a PNG at `path`, atomically.

    A panel whose map is None shows the plain image. Returns path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = max(1, min(columns, len(panels)))
    width, height = figure_size(len(panels), columns)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.text(0.5, 1 - HEADER_PX / 2 / height, caption, ha="center", va="center", fontsize=13, wrap=True)
    pixels = np.asarray(image)
    for k, (title, att) in enumerate(panels):
        row, col = divmod(k, columns)
        top = HEADER_PX + row * (TITLE_PX + PANEL_PX) + TITLE_PX  # panel's top edge, pixels from the top
        side = PANEL_PX - 2 * MARGIN_PX
        ax = fig.add_axes([(col * PANEL_PX + MARGIN_PX) / width, 1 - (top + side) / height,
                           side / width, side / height])
        ax.imshow(pixels)
        if att is not None:
            ax.imshow(heat_map(att, *pixels.shape[:2]), cmap="jet", alpha=ALPHA, vmin=0.0, vmax=1.0)
        ax.set_title(title, fontsize=12)
        ax.axis("off")
    with file_io.atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def figure_for(path_to_image: str, out_png: str, model, tokenizer, device, beam_size: int | None = None) -> dict:
    """Caption one image file and draw its figure; returns {"caption", "tokens", "png"}."""
    image = model_view(image_io.open_rgb(path_to_image), model.encoder.transform)
    caption, panels = word_maps(model, tokenizer, image, device, beam_size)
    draw_figure(image, caption, panels, out_png)
    return {"caption": caption, "tokens": [title for title, _ in panels], "png": out_png}


# ---------------------------------------------------------------------------
# Top-1 / last-1 by CLIPScore
# ---------------------------------------------------------------------------


def read_per_image(path: str) -> list:
    """p2_evaluate.py's --per-image list, checked: [{"key", "caption", "clip_score", ...}]."""
    rows = file_io.read_json(path, "the per-image file")
    if not isinstance(rows, list) or not rows:
        raise io_utils.InputError(f"{path!r} is not a non-empty JSON list (p2_evaluate.py --per-image FILE)")
    for i, row in enumerate(rows):
        if (not isinstance(row, dict) or not isinstance(row.get("key"), str)
                or not isinstance(row.get("clip_score"), (int, float)) or not isinstance(row.get("caption"), str)):
            raise io_utils.InputError(f"{path!r}: entry {i} needs a string 'key' and 'caption' and a number "
                                      f"'clip_score', got {row!r}")
    return rows


def extremes(per_image: str) -> dict:
    """{"top1": row, "last1": row}: the best and worst rows of --per-image by CLIPScore (by key on a tie)."""
    rows = sorted(read_per_image(per_image), key=lambda r: (-r["clip_score"], r["key"]))
    return {"top1": rows[0], "last1": rows[-1]}


def extreme_png(out_dir: str, rank: str, key: str) -> str:
    return os.path.join(out_dir, f"attention_{rank}_{key}.png")


def extreme_figures(per_image: str, images_root: str, out_dir: str, model, tokenizer, device,
                    beam_size: int | None = None) -> dict:
    """Draw the best and worst image by CLIPScore; {"top1": record, "last1": record}.

    A record is the per-image row (key, caption as scored, clip_score[, cider])
    with the figure's "png" and "tokens"; the figure's title is the caption
    generated now, which differs from the scored one only if the decoding does.
    """
    chosen = extremes(per_image)
    paths = image_io.find_images(images_root, sorted({row["key"] for row in chosen.values()}))
    records = {}
    for rank, row in chosen.items():
        png = extreme_png(out_dir, rank, row["key"])
        figure = figure_for(paths[row["key"]], png, model, tokenizer, device, beam_size)
        if figure["caption"] != row["caption"]:
            io_utils.warn(f"{row['key']!r} is captioned {figure['caption']!r} now, but was scored as "
                          f"{row['caption']!r}: different decoding settings?")
        records[rank] = {**row, "png": figure["png"], "tokens": figure["tokens"]}
    return records


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def load_model(checkpoint: str, decoder_weights: str, encoder_weights: str | None = None, device=None):
    """(model on device, tokenizer, device) from a P2 checkpoint."""
    import torch

    from captioner import load_checkpoint

    device = torch.device(device) if device is not None else io_utils.pick_device()
    model = load_checkpoint(checkpoint, decoder_weights, encoder_weights).to(device)
    return model, BPETokenizer(), device


# Where the notebook looks, in order: the course workflow's folders (the Makefile's DATA and OUT),
# then the demo's, whose weights cache is its own: (data, results, cache) relative to the repository.
LAYOUTS = (("hw3_data", "outputs", None),
           (os.path.join("demo", "hw3_data"), os.path.join("demo", "outputs"), os.path.join("demo", "cache")))


def notebook_inputs(root: str = io_utils.REPO_ROOT) -> dict:
    """What p2_visualize.ipynb draws, found by itself: the data and results folders from $HW3_DATA
    and $HW3_OUT when set, else the first layout of LAYOUTS (under `root`) that holds the decoder
    weights; the checkpoint from $HW3_P2_CKPT, else the run the workflow chose (OUT/p2_ckpt_best.txt),
    else the cache's. Returns {checkpoint, decoder_weights, encoder_weights, images (the p3_data
    images), per_image (None before p2_evaluate.py wrote it), images_root, out_dir, cache (the
    demo's weights cache, else None)}; InputError naming what is missing and how to point at it.
    """
    if os.environ.get("HW3_DATA") or os.environ.get("HW3_OUT"):
        layouts = [(os.environ.get("HW3_DATA") or LAYOUTS[0][0], os.environ.get("HW3_OUT") or LAYOUTS[0][1], None)]
    else:
        layouts = LAYOUTS
    found = [(os.path.join(root, d), os.path.join(root, o), c and os.path.join(root, c)) for d, o, c in layouts
             if os.path.isfile(os.path.join(root, d, "p2_data", "decoder_model.bin"))]
    if not found:
        looked = " and ".join(os.path.join(root, d, "p2_data", "decoder_model.bin") for d, _, _ in layouts)
        raise io_utils.InputError(f"no course data here: {looked} do not exist. Run `make data` (or `make demo`), "
                                  "or set HW3_DATA to the folder holding p2_data/ and p3_data/ and HW3_OUT to "
                                  "the results folder (build_report.py's --results)")
    data, out, cache = found[0]
    checkpoint = io_utils.p2_checkpoint(root)
    best = os.path.join(out, "p2_ckpt_best.txt")
    if checkpoint == io_utils.cache_dir(io_utils.P2_CHECKPOINT_NAME, repo=root) and os.path.isfile(best):
        # $HW3_P2_CKPT unset: the workflow's choice
        checkpoint = os.path.join(root, file_io.read_text(best, "the workflow's choice of checkpoint").strip())
    if not os.path.isfile(checkpoint):
        raise io_utils.InputError(f"no checkpoint at {checkpoint!r}: set HW3_P2_CKPT, or run the workflow "
                                  f"(`make report`), which names its choice in {best}")
    p3 = os.path.join(data, "p3_data", "images")
    images = sorted(os.path.join(p3, n) for n in os.listdir(p3)) if os.path.isdir(p3) else []
    per_image = os.path.join(out, "p2_per_image.json")
    return dict(checkpoint=checkpoint, decoder_weights=os.path.join(data, "p2_data", "decoder_model.bin"),
                encoder_weights=os.environ.get("HW3_P2_ENCODER_WEIGHTS") or None, images=images,
                per_image=per_image if os.path.isfile(per_image) else None,
                images_root=os.path.join(data, "p2_data", "images", "val"), out_dir=out, cache=cache)


def _read_json_dict(path: str) -> dict:
    """The JSON object at path, or {} when there is none yet."""
    if not os.path.isfile(path):
        return {}
    data = file_io.read_json(path, "the earlier figures' record (move it away)")
    if not isinstance(data, dict):
        raise io_utils.InputError(f"{path!r} exists but is not a JSON object; move it away")
    return data


ENVIRONMENT = """Environment:
  HW3_P2_CKPT             the checkpoint without --checkpoint (default: the cache's)
  HW3_P2_ENCODER_WEIGHTS  the encoder's weights without --encoder-weights (default: the
                          file the checkpoint records, else the cache's)
  HW3_DATA, HW3_OUT       p2_visualize.ipynb only (notebook_inputs): the course data and the
                          results folder (default: hw3_data and outputs, else the demo's)"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=ENVIRONMENT,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", nargs="+", default=[], metavar="IMG",
                   help="images to draw (e.g. p3_data/images/*.jpg; default: none)")
    p.add_argument("--per-image", metavar="FILE",
                   help="p2_evaluate.py --per-image output: draw its top-1 and last-1 (default: none)")
    p.add_argument("--images-root", metavar="DIR",
                   help="the folder of the --per-image keys' images (required with --per-image)")
    p.add_argument("--out-dir", required=True, help="folder for attention_*.png and attention.json")
    p.add_argument("--checkpoint", help="P2 checkpoint (default $HW3_P2_CKPT, else the cache)")
    p.add_argument("--decoder-weights", required=True, help="the course's decoder_model.bin (GPT-2)")
    p.add_argument("--encoder-weights", default=os.environ.get("HW3_P2_ENCODER_WEIGHTS") or None,
                   help="local encoder weights file ($HW3_P2_ENCODER_WEIGHTS when set; default: as p2_inference.py "
                        "finds them, the file the checkpoint was trained with, else the cache)")
    p.add_argument("--beam-size", type=io_utils.Range(int, 1),
                   help="beam size, 1 = greedy, an integer >= 1 and at most captioner.MAX_BEAM (default: the "
                        "checkpoint's decoding settings)")
    args = p.parse_args(argv)
    from captioner import MAX_BEAM

    if not args.images and not args.per_image:
        p.error("nothing to draw: give --images and/or --per-image")
    if bool(args.per_image) != bool(args.images_root):
        p.error("--per-image and --images-root go together")
    if args.beam_size is not None and not 1 <= args.beam_size <= MAX_BEAM:
        p.error(f"--beam-size must be within 1..{MAX_BEAM}, got {args.beam_size}")
    return args


def image_stems(paths: list, per_image: str | None = None) -> dict:
    """{stem: path} of the images to draw, each checked before any model loads: it exists, it decodes,
    and no two share a record in attention.json (nor one the top1/last1 records of --per-image)."""
    stems = {}
    for path in paths:
        file_io.check_input_file(path, "image")
        try:
            image_io.open_rgb(path)  # a broken image would otherwise fail after the model loads
        # Pillow's plugins raise more than OSError on corrupt data (see image_io.ReadableImages).
        except Exception as error:  # noqa: BLE001
            raise io_utils.InputError(f"image {path!r} cannot be decoded: {error}") from None
        stem = io_utils.strip_extension(os.path.basename(path))
        if stem in stems or (per_image and stem in EXTREMES):
            raise io_utils.InputError(f"{path!r} and {stems.get(stem, per_image)!r} would both be "
                                      f"recorded as {stem!r} in attention.json")
        stems[stem] = path
    if per_image:
        read_per_image(per_image)
    return stems


def draw_figures(model, tokenizer, device, out_dir: str, stems: dict, per_image: str | None = None,
                 images_root: str | None = None, beam_size: int | None = None) -> dict:
    """Draw `stems` ({stem: image path}) and, with `per_image`, its top-1 and last-1 images into
    `out_dir`, and record them in out_dir/attention.json (where build_report.py looks), keeping the
    entries an earlier run wrote for other images. Returns this run's records, by stem / rank."""
    json_path = os.path.join(out_dir, "attention.json")
    results, drawn = _read_json_dict(json_path), {}
    for stem, path in stems.items():
        record = figure_for(path, os.path.join(out_dir, f"attention_{stem}.png"), model, tokenizer, device,
                            beam_size)
        drawn[stem] = {**record, "png": os.path.basename(record["png"])}
        print(f"{stem}: {record['caption']}", file=sys.stderr)
    if per_image:
        for rank, record in extreme_figures(per_image, images_root, out_dir, model, tokenizer, device,
                                            beam_size).items():
            drawn[rank] = {**record, "png": os.path.basename(record["png"])}
            print(f"{rank}: {record['key']} (CLIPScore {record['clip_score']:.4f}): {record['caption']}",
                  file=sys.stderr)
    results.update(drawn)
    file_io.atomic_write_text(json_path, json.dumps(results, ensure_ascii=False, indent=2, sort_keys=True) + "\n")
    print(f"wrote {len(drawn)} figures and {json_path}", file=sys.stderr)
    return drawn


@io_utils.reports_input_errors
def main(argv=None) -> None:
    io_utils.quiet_known_warnings()
    args = parse_args(argv)
    # Every cheap check before the model loads.
    stems = image_stems(args.images, args.per_image)
    try:
        file_io.check_output_path(os.path.join(args.out_dir, "attention.json"))
    except io_utils.InputError as error:
        raise io_utils.InputError(f"--out-dir: {error}") from None
    if not os.path.isfile(args.decoder_weights):
        problem = "is a folder; expected a file" if os.path.isdir(args.decoder_weights) else "do not exist"
        raise io_utils.InputError(f"decoder weights {args.decoder_weights!r} {problem} (the course's "
                                  "decoder_model.bin)")
    if args.checkpoint is None:
        args.checkpoint = io_utils.existing_p2_checkpoint()
    outputs = {"--out-dir attention.json": os.path.join(args.out_dir, "attention.json"),
               **{f"--out-dir attention_{stem}.png": os.path.join(args.out_dir, f"attention_{stem}.png")
                  for stem in stems}}
    inputs = {"--per-image": args.per_image, "--checkpoint": args.checkpoint,
              "--decoder-weights": args.decoder_weights, "--encoder-weights": args.encoder_weights,
              **{f"--images {path!r}": path for path in stems.values()}}
    if args.per_image:  # the top-1 / last-1 figures and the images they are drawn from
        chosen = extremes(args.per_image)
        found = image_io.find_images(args.images_root, sorted({row["key"] for row in chosen.values()}))
        for rank, row in chosen.items():
            png = extreme_png(args.out_dir, rank, row["key"])
            outputs[f"--out-dir {os.path.basename(png)}"] = png
        inputs.update({f"--images-root {key!r}": path for key, path in found.items()})
    file_io.check_outputs_spare_inputs(outputs, inputs)
    file_io.check_input_file(args.checkpoint, "checkpoint")
    if args.encoder_weights:
        file_io.check_input_file(args.encoder_weights, "encoder weights file")
    _read_json_dict(os.path.join(args.out_dir, "attention.json"))  # an earlier record that is no JSON object

    try:
        model, tokenizer, device = load_model(args.checkpoint, args.decoder_weights, args.encoder_weights)
    except io_utils.InputError:
        raise
    # torch.load and the layout checks fail in many ways (pickle, zip, ValueError, missing file) on a wrong file.
    except Exception as error:  # noqa: BLE001
        first = (str(error).splitlines() or [""])[0]
        why = first if isinstance(error, ValueError) else f"{type(error).__name__}: {first}"
        raise io_utils.InputError(f"cannot build the captioner from {args.checkpoint!r} and "
                                  f"{args.decoder_weights!r}: {why}") from None
    draw_figures(model, tokenizer, device, args.out_dir, stems, args.per_image, args.images_root, args.beam_size)

if __name__ == "__main__":
    main()
