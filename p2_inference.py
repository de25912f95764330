"""Problem 2: caption every image in a folder with the trained captioner.

    python3 p2_inference.py IMG_DIR OUT_JSON DECODER_WEIGHTS

Writes `{"<file name without its last extension>": "caption", ...}` for every
file in IMG_DIR that Pillow can read (`photo.v2.JPEG` -> `photo.v2`); other
files are skipped with a warning naming them, and so is a file whose name is
not valid UTF-8 (JSON is UTF-8 text: no key can name it, and the rest must
still be written). DECODER_WEIGHTS is the course's `decoder_model.bin`.
The checkpoint describes its own architecture, encoder and decoding settings,
so there are no model options.

Environment (the graders' command line is fixed, so options live here):
  HW3_P2_CKPT             the checkpoint (default `<cache>/p2_checkpoint.pt`,
                          filled by `bash hw3_download.sh`)
  HW3_P2_ENCODER_WEIGHTS  a local file with the encoder's weights (default: the
                          file the checkpoint was trained with, if it is still
                          there unchanged, else `<cache>/timm/<encoder>.pth`)
  HW3_P2_BEAM             beam size 1..20 (default: the checkpoint's)
  HW3_P2_MAX_LEN          most tokens per caption, up to the decoder's context
                          less 2 (default: the checkpoint's)
  HW3_P2_LENGTH_PENALTY   length penalty 0..5 (default: the checkpoint's)
  HW3_P2_BATCH            images decoded together (default: on CUDA as many as
                          half the free GPU memory holds, `decoding_bytes`;
                          on the CPU 32)
  HW3_P2_CUDA_GRAPH       on CUDA, replay each beam search step as a CUDA
                          graph: 1 yes (an error where this torch cannot
                          capture one: built with CUDA < 11.0, as PyPI's torch
                          1.12.1 is); 0 no, plain eager steps; unset (default):
                          yes on torch >= 2 built with CUDA >= 11.0, where the
                          replayed steps were checked against eager ones on a
                          GPU, else eager. The same captions either way; the
                          graph saves the host's time per step.
  HW3_P2_PROFILE          a JSON file to write the run's time per phase to
                          (load, read, encode, decode, text, write; on CUDA
                          each phase is synchronised, so the profile costs a
                          little; default: none written)
  HW3_CACHE               root of the cache (default `<repo>/cache`)

On CUDA the images are read and preprocessed by worker processes while the
GPU encodes each batch of READ_BATCH images; the image tokens wait on the GPU
until a decoding batch is full.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import TYPE_CHECKING

import image_io
import file_io
import io_utils
from clip_context import fit_clip_context
from tokenizer import BPETokenizer, find_vocab_dir

if TYPE_CHECKING:  # torch and the model load after the arguments are parsed: `--help` answers at once
    import torch

DEFAULT_BATCH = 32  # images decoded together on the CPU
BATCH = io_utils.Range(int, 1)  # $HW3_P2_BATCH: images decoded together
READ_BATCH = 64  # images read and encoded together on CUDA
# Share of the free GPU memory the decoding batch may fill (`Captioner.decoding_bytes`); the rest
# is for the encoder's activations, the allocator's slack and what the estimate leaves out.
MEMORY_SHARE = 0.5
FALLBACK_CAPTION = "a photo."
# The first torch release on which the CUDA-graph search was checked on a GPU against eager steps
# (torch 2.11 on an H200, bench/RESULTS.md). No GPU here runs torch 1.x, so by default it decodes eagerly.
GRAPH_CHECKED_FROM = 2


# -- what the graders receive as a caption ---------------------------------------


def caption_batch(model, feats: torch.Tensor, tokenizer, names: list, generation: dict,
                  cuda_graph: bool = False, timer=None) -> list:
    """Caption text per image as written to OUT_JSON: decoded, whitespace collapsed,
    never empty, within CLIP's context.

    The model cannot end a caption before its first token, but whitespace
    tokens can decode to nothing: such an image is decoded again greedily, and
    gets FALLBACK_CAPTION only if that is empty too. A caption too long for
    CLIP's context (which crashes the course's CLIPScore script) loses its last
    words. Each change is a warning naming the file (`names`). `timer` (an io_utils.PhaseTimer)
    counts the search as "decode" and the rest as "text".
    """
    from captioner import caption_text

    phase = timer or (lambda name: contextlib.nullcontext())
    with phase("decode"):
        captions = model.generate(feats, **generation, cuda_graph=cuda_graph)
    with phase("text"):
        texts = [caption_text(tokenizer, ids) for ids in captions]
        empty = [i for i, text in enumerate(texts) if not text]
    if empty:
        with phase("decode"):
            greedy = model.generate(feats[empty], **{**generation, "beam_size": 1})
        for i, ids in zip(empty, greedy):
            texts[i] = caption_text(tokenizer, ids) or FALLBACK_CAPTION
            io_utils.warn(f"the caption of {names[i]!r} was empty; it is now {texts[i]!r}")
    with phase("text"):
        fitted = [fit_clip_context(text) for text in texts]
        for name, text, fit in zip(names, texts, fitted):
            if fit != text:
                io_utils.warn(f"the caption of {name!r} was cut to fit CLIP's 77-token context: {fit!r}")
    return fitted


def generation_overrides() -> dict:
    """Decoding settings from the environment; None keeps the checkpoint's."""
    from captioner import MAX_BEAM, MAX_LENGTH_PENALTY

    number, Range = io_utils.env_number, io_utils.Range
    return {
        "beam_size": number("HW3_P2_BEAM", Range(int, 1, MAX_BEAM)),
        "max_len": number("HW3_P2_MAX_LEN", Range(int, 1)),
        "length_penalty": number("HW3_P2_LENGTH_PENALTY", Range(float, 0, MAX_LENGTH_PENALTY)),
    }


def decoding_batch(model, generation: dict, device, n_images: int) -> int:
    """Images decoded together: $HW3_P2_BATCH, else on CUDA as many as MEMORY_SHARE of the free
    memory holds (at most all of them), else DEFAULT_BATCH."""
    chosen = io_utils.env_number("HW3_P2_BATCH", BATCH)
    if chosen is not None:
        return chosen
    if device.type != "cuda":
        return DEFAULT_BATCH
    per_image = model.decoding_bytes(generation, element_bytes=2)  # fp16 autocast on CUDA
    return max(1, min(n_images, int(io_utils.free_cuda_memory(device) * MEMORY_SHARE) // per_image))


def cuda_graph_choice(requested: int | None, device) -> tuple:
    """(whether each beam search step is replayed as a CUDA graph, why not where the device is CUDA
    and it is not): $HW3_P2_CUDA_GRAPH as `requested` (None when unset, then torch >= 2 only:
    GRAPH_CHECKED_FROM). InputError when 1 asks for what this torch cannot do."""
    if device.type != "cuda":
        return False, None
    if requested == 0:
        return False, "HW3_P2_CUDA_GRAPH=0"
    import torch

    from decoder import cuda_graph_unsupported

    unsupported = cuda_graph_unsupported()
    if unsupported and requested == 1:
        raise io_utils.InputError(f"HW3_P2_CUDA_GRAPH=1, but {unsupported}: set it to 0 or leave it unset")
    if unsupported:
        return False, unsupported
    if requested is None and int(torch.__version__.split(".")[0]) < GRAPH_CHECKED_FROM:
        return False, (f"torch {torch.__version__}: replayed steps were checked against eager ones on torch "
                       f">= {GRAPH_CHECKED_FROM} only (HW3_P2_CUDA_GRAPH=1 captures anyway)")
    return True, None


def image_keys(folder: str, names: list) -> dict:
    """File name -> output key; InputError naming both files when two images share a key.

    Only files that decode count (image_io.is_image), as in captioning: a
    truncated `a.png` beside a good `a.jpg` is skipped later, not a collision.
    """
    groups = {}
    for name in names:
        groups.setdefault(io_utils.strip_extension(name), []).append(name)
    for key, group in groups.items():
        images = [n for n in group if image_io.is_image(os.path.join(folder, n))] if len(group) > 1 else group
        if len(images) > 1:
            raise io_utils.InputError(f"images {' and '.join(map(repr, images))} in {folder!r} would both be "
                                      f"captioned as {key!r}; the output holds one caption per name without "
                                      "extension")
    return {name: io_utils.strip_extension(name) for name in names}


@io_utils.reports_input_errors
def main(argv=None) -> None:
    io_utils.quiet_known_warnings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__[__doc__.index("Environment ("):])
    parser.add_argument("img_dir", help="folder of images (any names, any Pillow-readable format)")
    parser.add_argument("out_json", help="output JSON (its folder is created)")
    parser.add_argument("decoder_weights", help="the course's decoder_model.bin (GPT-2)")
    args = parser.parse_args(argv)
    import torch

    from captioner import autocast, load_checkpoint

    # Every cheap check first, so a bad argument fails before the models load.
    overrides = generation_overrides()
    io_utils.env_number("HW3_P2_BATCH", BATCH)
    graph_requested = io_utils.env_number("HW3_P2_CUDA_GRAPH", io_utils.Range(int, 0, 1))
    profile_path = os.environ.get("HW3_P2_PROFILE") or None
    checkpoint = io_utils.existing_p2_checkpoint()
    if not os.path.isfile(args.decoder_weights):
        problem = "is a folder; expected a file" if os.path.isdir(args.decoder_weights) else "do not exist"
        raise io_utils.InputError(f"decoder weights {args.decoder_weights!r} {problem} (the course's "
                                  "decoder_model.bin)")
    file_io.check_output_path(args.out_json)
    if profile_path:
        file_io.check_output_path(profile_path)
    names = image_io.list_files(args.img_dir)
    outputs = {"OUT_JSON": args.out_json, "HW3_P2_PROFILE": profile_path}
    vocabulary = find_vocab_dir()
    file_io.check_outputs_spare_inputs(outputs, {
        "IMG_DIR": args.img_dir, "DECODER_WEIGHTS": args.decoder_weights, "HW3_P2_CKPT": checkpoint,
        "HW3_P2_ENCODER_WEIGHTS": os.environ.get("HW3_P2_ENCODER_WEIGHTS"),
        "GPT-2 vocabulary": os.path.join(vocabulary, "encoder.json"),
        "GPT-2 merges": os.path.join(vocabulary, "vocab.bpe")}, reads_member=image_io.is_image)
    keys = image_keys(args.img_dir, names)
    tokenizer = BPETokenizer()  # a missing or damaged vocabulary is an InputError naming the file

    device = io_utils.pick_device()
    use_graph, eager_because = cuda_graph_choice(graph_requested, device)
    timer = io_utils.PhaseTimer(device, sync=profile_path is not None)
    try:
        with timer("load"):
            model = load_checkpoint(checkpoint, args.decoder_weights,
                                    os.environ.get("HW3_P2_ENCODER_WEIGHTS") or None, device=device)
    # torch.load and the layout checks fail in many ways (pickle, zip, ValueError, missing file) on a wrong file.
    except Exception as error:  # noqa: BLE001
        raise SystemExit(f"error: cannot build the captioner from {checkpoint!r} and {args.decoder_weights!r}: {error}")
    # the encoder's file is known now (the checkpoint's record, else the cache): it is an input too
    file_io.check_outputs_spare_inputs(outputs, {"the encoder weights": model.encoder.weights})
    try:
        generation = model.generation(**overrides)
    except ValueError as error:  # an override the decoder cannot take (max_len beyond its context)
        raise SystemExit(f"error: {error} (HW3_P2_BEAM, HW3_P2_MAX_LEN and HW3_P2_LENGTH_PENALTY "
                         "override the checkpoint's decoding settings)")
    batch_size = decoding_batch(model, generation, device, len(names))
    read_size = min(READ_BATCH, batch_size) if device.type == "cuda" else batch_size

    results = {}
    pending, pending_names = [], []  # image tokens [b, S, W] on the device, and their files

    def decode(count: int) -> None:
        feats = torch.cat(pending)
        batch_names = pending_names[:count]
        texts = caption_batch(model, feats[:count], tokenizer, batch_names, generation, use_graph, timer)
        results.update((keys[name], text) for name, text in zip(batch_names, texts))
        pending[:] = [feats[count:]] if count < len(feats) else []
        del pending_names[:count]

    paths = [os.path.join(args.img_dir, n) for n in names]
    batches = iter(image_io.readable_batches(paths, [model.encoder.transform], read_size, device, "captions",
                                             pin_memory=False if use_graph else None))
    with torch.no_grad(), autocast(device):
        while True:
            with timer("read"):
                item = next(batches, None)
            if item is None:
                break
            indices, (images,) = item
            with timer("encode"):
                pending.append(model.encode(images.to(device, non_blocking=True)))  # [b, S, W]
            pending_names.extend(names[i] for i in indices)
            while len(pending_names) >= batch_size:
                decode(batch_size)
        if pending_names:
            decode(len(pending_names))
    if not results:
        raise SystemExit(f"error: no readable image in {args.img_dir!r} ({len(names)} files, none an image)")

    with timer("write"):
        file_io.atomic_write_text(args.out_json,
                                   json.dumps(results, ensure_ascii=False, indent=2, sort_keys=True) + "\n")
    steps = ", CUDA graph" if use_graph else f", eager steps: {eager_because}" if eager_because else ""
    print(f"wrote {len(results)} captions to {args.out_json} ({len(names) - len(results)} files skipped; "
          f"{device.type}, {batch_size} images per decoding batch{steps})", file=sys.stderr)
    if profile_path:
        element_bytes = 2 if device.type == "cuda" else 4
        file_io.atomic_write_text(profile_path, timer.profile(
            images=len(results), batch=batch_size, read_batch=read_size, cuda_graph=use_graph, device=device.type,
            decoding_bytes_per_image=model.decoding_bytes(generation, element_bytes), generation=generation))


if __name__ == "__main__":
    main()
