"""Problem 2: train the captioner (frozen ViT + GPT-2 with cross-attention and PEFT).

    python3 p2_train.py --data-root hw3_data/p2_data --decoder-weights hw3_data/p2_data/decoder_model.bin \\
        --peft adapter --out checkpoints/adapter.pt --cache-features cache/features

A run has three phases, one after the other:

1. cross-entropy on every caption (the course's alignment, p2_data.py), AdamW
   with a linear warm-up and a cosine decay that both follow the run's real
   length (--epochs, --max-steps), fp16 autocast + GradScaler on CUDA;
2. self-critical sequence training (--scst-epochs, 0 skips it), starting from
   the best cross-entropy weights: --scst-samples captions per image, by
   default the final beams of a beam search that wide (the captions decoding
   chooses among; --scst-candidates sample draws them with top-k / nucleus
   filtering instead), each rewarded by CIDEr-D against the image's
   references (document frequencies from the training set) less the mean
   reward of the image's other captions (Luo 2020, "A better variant of
   self-critical sequence training"), so no greedy pass is needed;
3. decoding chosen on validation: the best weights caption the validation set
   with every beam size x length penalty of --decode-beams x
   --decode-length-penalties; the best pair by CIDEr goes into the saved
   checkpoint, which inference then uses with no flag. The table is logged.

Validation CIDEr (in-process, equal to coco-caption's on the same tokens) at
every epoch's end and every --val-every steps keeps the best checkpoint at
--out, `{config, state_dict}` with the trainable tensors only.

Files next to --out: OUT.state (what --resume needs: trainable tensors, the
best ones, optimizer, scaler, progress, random streams, the run's settings),
OUT.log.jsonl (loss, learning rate, SCST rewards, metrics, the decoding
table), OUT.val.json (the best validation captions). All written atomically.
An interrupted run continues with --resume exactly as if it had never
stopped; the log drops what the interrupted run wrote after its last saved
state. --resume refuses any setting that changes the run (data, model,
batch size, schedule, SCST, seed, device type); only logging, saving,
validation, the decoding grid and the learning rates (--lr, --scst-lr: to
continue a diverged run more gently) may change. Ctrl-C ends a run with the
step it stopped at and the command that resumes it (exit 130).

Length: --max-steps N is the number of optimiser steps of the whole run, as
in Hugging Face's Trainer, and overrides --epochs: the SCST phase keeps its
own length S (--scst-epochs, --scst-max-steps) and cross-entropy takes the
other N - S steps, first. Without it cross-entropy lasts --epochs. The
warm-up (--warmup-fraction of the phase, at most --warmup-steps) and the
cosine decay follow the cross-entropy phase's real length; the start of the
run prints the plan. For a quick look, add --val-every so that the best
checkpoint is chosen from more than the epoch ends, and --scst-epochs 0
--decode-beams 1 to skip the later phases.

Every numeric option is checked against its range (RANGES) when parsed. A
non-finite loss or gradient ends the run with an error naming the step, the
loss and the learning rate (on CUDA: MAX_SKIPPED_STEPS steps in a row that
the GradScaler skipped); OUT.state keeps the last good state, never
non-finite weights, and --out only ever holds validated weights. A run whose
best checkpoint is the untrained step-0 model says so at its end and in its
log. OUT.lock keeps a second run off the same --out; none of the outputs
may be one of the inputs (--decoder-weights, the data, ...).

    python3 p2_train.py --print-params --peft lora      # trainable count, no data needed
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import shlex
import shutil
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from captioner import (
    MAX_BEAM,
    MAX_LENGTH_PENALTY,
    PEFT_PRESETS,
    Captioner,
    autocast,
    caption_text,
    count_parameters,
    make_config,
    mark_trainable,
    save_checkpoint,
    trainable_state,
)
from cider import CiderD, tokenize
from decoder import LORA_TARGETS
from encoder import DEFAULT_ENCODER, cached_weights_path
from clipscore import clip_scores
from file_io import process_exists
from file_io import atomic_torch_save, atomic_write_text, check_output_path, check_outputs_spare_inputs
from io_utils import WORKERS, InputError, Range, loader_workers, pick_device, quiet_known_warnings, warn
from weights import torch_load
from p2_data import (
    IGNORE_INDEX,
    CaptionSamples,
    EpochSampler,
    Split,
    collate_captions,
    make_batch,
    prepare_images,
)
from tokenizer import EOT_ID, BPETokenizer, find_vocab_dir

# Options --resume lets change: they decide what is logged, saved or measured, never a training step.
# The learning rates may change too: a run that diverged continues from its last good state with a smaller one.
RESUMABLE_CHANGES = ("resume", "log_every", "save_every", "workers", "val_every", "val_images", "val_beam_size",
                     "clipscore", "clip_model", "decode_beams", "decode_length_penalties", "lr", "scst_lr",
                     "strict_data")
PATH_OPTIONS = ("data_root", "decoder_weights", "encoder_weights", "cache_features")
PHASE_NAMES = {"xe": "cross-entropy", "scst": "SCST", "decode": "decoding grid", "done": "done"}
DEFAULT_EPOCHS = 5


# -- options ------------------------------------------------------------------------------------


POSITIVE = Range(float, 0, low_open=True)
FRACTION = Range(float, 0, 1)
COUNT = Range(int, 0)
SIZE = Range(int, 1)
# Every numeric option's range, by its argparse name. The parser takes its type from here and
# --resume checks a saved run's settings against it (MAX_BEAM and MAX_LENGTH_PENALTY bound the
# decoding grid, which runs only after training).
RANGES = {
    "epochs": COUNT, "max_steps": COUNT, "batch_size": SIZE, "lr": POSITIVE, "min_lr_ratio": FRACTION,
    "warmup_fraction": FRACTION, "warmup_steps": COUNT, "weight_decay": Range(float, 0),
    "label_smoothing": Range(float, 0, 1, high_open=True), "grad_clip": Range(float, 0, low_open=True, off="none"),
    "seed": Range(int, 0, 2 ** 31 - 1), "workers": WORKERS,
    "cross_layers": COUNT, "adapter_dim": SIZE, "adapter_layers": COUNT, "prefix_len": SIZE, "prefix_hidden": COUNT,
    "lora_rank": SIZE, "lora_alpha": POSITIVE, "lora_dropout": Range(float, 0, 1, high_open=True),
    "scst_epochs": COUNT, "scst_max_steps": COUNT, "scst_lr": POSITIVE, "scst_batch_size": SIZE,
    "scst_samples": Range(int, 2), "scst_top_k": COUNT, "scst_top_p": Range(float, 0, 1, low_open=True),
    "max_len": SIZE, "decode_beams": Range(int, 1, MAX_BEAM), "decode_length_penalties": Range(float, 0, MAX_LENGTH_PENALTY),
    "val_every": COUNT, "val_images": COUNT, "val_beam_size": Range(int, 1, MAX_BEAM), "save_every": SIZE,
    "log_every": SIZE,
}
# Each PEFT method's size option, and the options that only shape that method.
PEFT_OPTIONS = {"adapter_dim": ("adapter_places", "adapter_layers"), "prefix_len": ("prefix_hidden",),
                "lora_rank": ("lora_alpha", "lora_targets", "lora_dropout")}
# timm.create_model arguments the encoder sets itself (or that would change what it returns)
ENCODER_OWN_KWARGS = ("pretrained", "num_classes", "weight_init", "checkpoint_path", "pretrained_cfg",
                      "pretrained_cfg_overlay", "features_only", "global_pool")


def add(group, flag: str, help: str, **kwargs) -> None:
    """An option; a numeric one takes its type from RANGES, and its help line ends with the range."""
    name = flag[2:].replace("-", "_")
    if name in RANGES:
        kwargs["type"] = RANGES[name]
        help = f"{help}; {RANGES[name]}"
    group.add_argument(flag, help=help, **kwargs)


def json_object(text: str) -> dict:
    """--encoder-kwargs: a JSON object."""
    try:
        value = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"img_size\": 32}}', got {text!r}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("data and files")
    io.add_argument("--data-root", help="course layout: images/train/, images/val/, train.json, val.json "
                                        "(required unless --print-params)")
    io.add_argument("--decoder-weights", help="the course's decoder_model.bin (GPT-2; required unless "
                                              "--print-params, which otherwise uses random weights)")
    io.add_argument("--out", help="best checkpoint by validation CIDEr; OUT.state, OUT.log.jsonl, OUT.val.json and "
                                  "the run's lock OUT.lock beside it (required unless --print-params)")
    io.add_argument("--resume", action="store_true",
                    help="continue the run whose OUT.state exists, with its settings (only logging, saving, "
                         "validation, the learning rates and --decode-* options may differ)")
    io.add_argument("--cache-features", metavar="DIR",
                    help="store the frozen encoder's features (fp16) here once; later epochs skip the ViT "
                         "(default: none, the ViT runs on every batch)")
    io.add_argument("--strict-data", action="store_true",
                    help="an image that cannot be read is an error before training (default: off, it is skipped "
                         "with a warning, its captions left out, and counted in the summary)")
    io.add_argument("--print-params", action="store_true",
                    help="build the model (random weights unless files are given), print trainable counts, exit")

    model = p.add_argument_group("model (a PEFT size option adds that method to any preset)")
    model.add_argument("--peft", choices=sorted(PEFT_PRESETS), default="adapter",
                       help="PEFT preset (default %(default)s); the options below override its values")
    model.add_argument("--encoder", default=DEFAULT_ENCODER, help="timm ViT name (default %(default)s)")
    model.add_argument("--encoder-weights", help="local encoder weights file (default: repository cache or timm)")
    model.add_argument("--encoder-kwargs", type=json_object, default=None,
                       help="JSON object of extra timm.create_model arguments, e.g. a small ViT for tests "
                            f"(default: none; {', '.join(ENCODER_OWN_KWARGS)} are set by the encoder itself)")
    add(model, "--cross-layers", "GPT-2 blocks with cross-attention, by index (default: all)", nargs="+")
    add(model, "--adapter-dim", "adapter bottleneck width, in channels (default: the preset's, 128 for "
                                "adapter, none for the others)")
    model.add_argument("--adapter-places", nargs="+", choices=["attn", "mlp"],
                       help="where in each block the adapters sit (default: attn mlp)")
    add(model, "--adapter-layers", "blocks with adapters, by index (default: all)", nargs="+")
    add(model, "--prefix-len", "prefix tokens per layer (default: the preset's, 64 for prefix, none for the others)")
    add(model, "--prefix-hidden", "width of the reparameterisation MLP used while training, folded away when "
                                  "saved; 0: none (default: the preset's, 256)")
    add(model, "--lora-rank", "LoRA rank (default: the preset's, 32 for lora, none for the others)")
    add(model, "--lora-alpha", "LoRA alpha: the update is scaled by alpha / rank (default: the preset's, 32)")
    model.add_argument("--lora-targets", nargs="+", choices=list(LORA_TARGETS),
                       help=f"the linear maps LoRA adapts (default: all four, {' '.join(LORA_TARGETS)})")
    add(model, "--lora-dropout", "dropout on LoRA's input while training, a probability (default: 0)")

    opt = p.add_argument_group(
        "training length",
        "A run is cross-entropy steps, then SCST steps (--scst-epochs, --scst-max-steps), then the decoding grid "
        "(validation passes, no training). Without --max-steps cross-entropy lasts --epochs epochs. --max-steps N "
        "is the number of optimiser steps of the whole run, as in Hugging Face's Trainer: it overrides --epochs, "
        "the SCST phase keeps its own length S and cross-entropy gets the other N - S steps, first. The start of "
        "the run prints the plan.")
    add(opt, "--epochs", "cross-entropy epochs over all captions (default 5; ignored with --max-steps)")
    add(opt, "--max-steps", "optimiser steps of the whole run, cross-entropy and SCST together, overriding "
                            "--epochs (default 0: no limit, --epochs decides)", default=0)
    xe = p.add_argument_group("cross-entropy phase (defaults: the full data on one 2080 Ti)")
    add(xe, "--batch-size", "captions per step (default %(default)s)", default=64)
    add(xe, "--lr", "peak learning rate (default %(default)s)", default=2e-4)
    add(xe, "--min-lr-ratio", "the cosine decay's floor, as a fraction of --lr (default %(default)s)", default=0.05)
    add(xe, "--warmup-fraction", "linear warm-up, as a fraction of the phase's steps (default %(default)s)",
        default=0.1)
    add(xe, "--warmup-steps", "the most warm-up steps (default %(default)s)", default=500)
    add(xe, "--weight-decay", "AdamW's decoupled weight decay on the linear maps' weights (default %(default)s)",
        default=0.01)
    add(xe, "--label-smoothing", "cross-entropy label smoothing (default %(default)s)", default=0.0)
    add(xe, "--grad-clip", "clip the gradients' global L2 norm to this (default %(default)s); none or 0 turns "
                           "clipping off", default=1.0)
    add(xe, "--seed", "seed of the initialisation, the batch order and the sampling (default %(default)s)", default=0)
    xe.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="where to train (default %(default)s: CUDA when available)")
    add(xe, "--workers", "data loading processes (default: 4 on CUDA, 0 on the CPU)")

    scst = p.add_argument_group("self-critical phase (from the best cross-entropy weights)")
    add(scst, "--scst-epochs", "epochs over the training images; 0 skips the phase (default %(default)s)", default=1)
    add(scst, "--scst-max-steps", "end the phase after this many steps (default %(default)s: all its epochs)",
        default=0)
    add(scst, "--scst-lr", "constant learning rate (default %(default)s)", default=1e-5)
    add(scst, "--scst-batch-size", "images per step (default %(default)s)", default=16)
    scst.add_argument("--scst-candidates", choices=("beam", "sample"), default="beam",
                      help="each image's captions (default %(default)s): the final beams of a beam search as wide "
                           "as --scst-samples (what decoding chooses among; on the synthetic set the steadiest "
                           "held-out gain, bench/RESULTS.md), or sampled with --scst-top-k / --scst-top-p")
    add(scst, "--scst-samples", "captions per image (default %(default)s)", default=5)
    add(scst, "--scst-top-k", "sampling only: among the k likeliest tokens (0: all; default 2: samples near the "
                              "greedy caption, so the update improves what decoding outputs; with 5 SCST lowered "
                              "held-out greedy CIDEr on the synthetic set, bench/RESULTS.md)")
    add(scst, "--scst-top-p", "sampling only: nucleus, the likeliest tokens holding p of the probability "
                              "(default 1: all)")

    gen = p.add_argument_group("decoding (chosen on validation after training, stored in the checkpoint)")
    add(gen, "--max-len", "most tokens per caption (default %(default)s)", default=30)
    add(gen, "--decode-beams", "beam sizes tried (default %(default)s; 5 is the largest the inference benchmark "
                               "is sized for)", nargs="+", default=[1, 3, 5])
    add(gen, "--decode-length-penalties", "length penalties tried with each beam size over 1: beam score / "
                                          "(length + 1) ** this (default %(default)s; greedy decoding has none)",
        nargs="+", default=[0.0, 0.5, 1.0])

    val = p.add_argument_group("validation and logging (may change on --resume)")
    add(val, "--val-every", "validate every N steps too (default %(default)s: at epoch ends only)", default=0)
    add(val, "--val-images", "validate on the first N images (default %(default)s: all)", default=0)
    add(val, "--val-beam-size", "beam size while validating (default %(default)s: greedy)", default=1)
    val.add_argument("--clipscore", action="store_true", help="also compute CLIPScore (CLIP ViT-B/32) when validating")
    val.add_argument("--clip-model", default="ViT-B/32", help="CLIP for --clipscore, a name or a file "
                                                              "(default %(default)s)")
    add(val, "--save-every", "save the resumable state every N steps (default %(default)s)", default=500)
    add(val, "--log-every", "log the loss every N steps (default %(default)s)", default=50)
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p, args) -> None:
    """What the options' ranges alone cannot say, checked before any work (p.error: one line, exit 2)."""
    if not args.print_params:
        missing = [f"--{n.replace('_', '-')}" for n in ("data_root", "decoder_weights", "out") if not getattr(args, n)]
        if missing:
            p.error("the following arguments are required: " + ", ".join(missing))
    if args.epochs is None and not args.max_steps:
        args.epochs = DEFAULT_EPOCHS  # with --max-steps it stays None unless given: then the plan says it is ignored
    sampling = {"scst_top_k": 2, "scst_top_p": 1.0}  # the sampling options and their defaults
    for name, default in sampling.items():
        if args.scst_candidates == "beam" and getattr(args, name) is not None:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} has no effect with --scst-candidates beam "
                    "(the default): add --scst-candidates sample to sample the captions")
        if args.scst_candidates == "sample" and getattr(args, name) is None:
            setattr(args, name, default)
    preset = PEFT_PRESETS[args.peft]
    for size, shaping in PEFT_OPTIONS.items():
        used = getattr(args, size) is not None or size in preset
        for name in shaping:
            if not used and getattr(args, name) is not None:
                p.error(f"--{name.replace('_', '-')} has no effect without the method it shapes: --peft "
                        f"{args.peft} has no --{size.replace('_', '-')}; give one, or choose the preset that has it")
    if args.encoder_kwargs is not None:
        try:
            check_encoder_kwargs(args.encoder, args.encoder_kwargs)
        except InputError as error:
            p.error(f"argument --encoder-kwargs: {error}")


def check_encoder_kwargs(name: str, kwargs: dict) -> None:
    """InputError unless timm's constructor of `name` takes every key of `kwargs`, none of them one the
    encoder sets itself, with a value of its default's type (an int for an int, a list or an int for a size)."""
    own = sorted(set(kwargs) & set(ENCODER_OWN_KWARGS))
    if own:
        raise InputError(f"{', '.join(own)} cannot be given: the encoder sets {', '.join(ENCODER_OWN_KWARGS)} itself")
    import inspect

    import timm
    from timm.models import model_entrypoint, split_model_name_tag

    if not timm.is_model(name):
        raise InputError(f"--encoder {name!r} is not a timm model")
    module = sys.modules[model_entrypoint(split_model_name_tag(name)[0]).__module__]
    vit = getattr(module, "VisionTransformer", None)
    if vit is None:
        return  # another family: whatever it refuses is reported when the encoder is built
    parameters = inspect.signature(vit.__init__).parameters
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        takes = [n for n in parameters if n not in ("self", "args", "kwargs", *ENCODER_OWN_KWARGS)]
        raise InputError(f"{', '.join(map(repr, unknown))} not among the arguments of timm's {vit.__name__} "
                         f"({', '.join(takes)})")
    for key, value in kwargs.items():
        default = parameters[key].default
        if isinstance(default, bool):
            kinds = (bool,)
        elif isinstance(default, int):
            kinds = (int, list)  # a size may be one number or one per side
        elif isinstance(default, float):
            kinds = (int, float)
        else:
            continue
        numbers = value if isinstance(value, list) else [value]
        if (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))
                or not all(isinstance(v, (int, float)) for v in numbers)):
            raise InputError(f"{key!r}: {value!r} is not of the type of timm's default {default!r}")
        if bool not in kinds and not all(math.isfinite(v) and v >= 0 for v in numbers):
            raise InputError(f"{key!r}: {value!r} is not a finite number >= 0")


def build_config(args) -> dict:
    return make_config(
        args.peft, encoder=args.encoder, encoder_kwargs=args.encoder_kwargs,
        generation=dict(beam_size=args.decode_beams[0], max_len=args.max_len,
                        length_penalty=args.decode_length_penalties[0]),
        cross_layers=args.cross_layers, adapter_dim=args.adapter_dim, adapter_places=args.adapter_places,
        adapter_layers=args.adapter_layers, prefix_len=args.prefix_len, prefix_hidden=args.prefix_hidden,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=args.lora_targets,
        lora_dropout=args.lora_dropout)


def build_model(args, **kwargs) -> Captioner:
    """The captioner of the options. What timm's constructor refuses in --encoder-kwargs beyond what
    check_encoder_kwargs could see (e.g. a width the heads do not divide) is an InputError."""
    try:
        return Captioner(build_config(args), args.decoder_weights, args.encoder_weights, **kwargs)
    except (TypeError, AssertionError, RuntimeError, ZeroDivisionError) as error:
        if not args.encoder_kwargs:
            raise
        raise InputError(f"--encoder-kwargs {json.dumps(args.encoder_kwargs)}: timm could not build "
                         f"{args.encoder} with them ({type(error).__name__}: {error})") from None


def print_params(args) -> None:
    model = build_model(args, pretrained_encoder=args.encoder_weights is not None)
    print(f"{args.peft}: trainable parameters by group", file=sys.stderr)
    training = sum(mark_trainable(model).values())
    saved = count_parameters(trainable_state(model))
    if saved != training:
        print(f"trainable parameters while training: {training} (the prefix MLP is folded away when saved)")
    print(f"trainable parameters: {saved}")


# -- schedule ------------------------------------------------------------------------------


def phase_steps(epochs: int, batches_per_epoch: int, max_steps: int) -> int:
    """The steps a phase will really take: its epochs, cut at max_steps (0: no cut)."""
    steps = epochs * batches_per_epoch
    return min(steps, max_steps) if max_steps else steps


def plan_steps(args, xe_batches: int, scst_batches: int) -> tuple:
    """(cross-entropy steps, SCST steps). SCST keeps its own length (--scst-epochs, --scst-max-steps);
    cross-entropy lasts --epochs, or with --max-steps N the other N - SCST steps (N in all, --epochs ignored)."""
    scst = phase_steps(args.scst_epochs, scst_batches, args.scst_max_steps)
    if not args.max_steps:
        return args.epochs * xe_batches, scst
    if args.max_steps <= scst:
        raise InputError(f"--max-steps {args.max_steps} counts every optimiser step of the run, and the SCST phase "
                         f"alone takes {scst} (--scst-epochs {args.scst_epochs} of {scst_batches} steps"
                         + (f", --scst-max-steps {args.scst_max_steps}" if args.scst_max_steps else "")
                         + "): no step is left for cross-entropy; raise --max-steps, or shorten SCST "
                           "(--scst-max-steps, --scst-epochs 0)")
    return args.max_steps - scst, scst


def describe_plan(args, xe_total: int, xe_batches: int, scst_total: int, scst_batches: int, grid: int) -> str:
    """What the run will do, phase by phase, and what ends it."""
    epochs = lambda steps, per: f"{steps / per:.3g} epoch(s) of {per} steps"  # noqa: E731
    if args.max_steps:
        ends = (f"--max-steps {args.max_steps} ends the run"
                + (f"; --epochs {args.epochs} is ignored" if args.epochs is not None else ""))
    else:
        ends = f"--epochs {args.epochs} ends cross-entropy (no --max-steps)"
    phases = [f"{xe_total} cross-entropy steps ({epochs(xe_total, xe_batches)})"]
    if scst_total:
        phases.append(f"{scst_total} SCST steps ({epochs(scst_total, scst_batches)})")
    else:
        phases.append("no SCST (--scst-epochs 0)" if not args.scst_epochs else "no SCST")
    phases.append(f"the decoding grid ({grid} validation pass(es), no training)")
    return f"plan: {', then '.join(phases)}: {xe_total + scst_total} optimiser steps in all; {ends}"


def warmup_steps(total: int, args) -> int:
    return min(args.warmup_steps, round(args.warmup_fraction * total))


def learning_rate(step: int, total: int, args) -> float:
    """Linear warm-up to --lr, then cosine decay reaching --lr * --min-lr-ratio at the last step, total - 1."""
    warmup = warmup_steps(total, args)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_warnings(total: int, batches_per_epoch: int, args) -> list:
    """Settings with which the cross-entropy phase cannot go as the user likely meant."""
    warnings = []
    warmup = warmup_steps(total, args)
    if total and warmup > total // 2:
        warnings.append(f"the warm-up takes {warmup} of the phase's {total} steps (--warmup-fraction "
                        f"{args.warmup_fraction}): the learning rate peaks late and has little time to decay")
    if total < batches_per_epoch and not args.val_every:
        warnings.append(f"cross-entropy ends inside its first epoch ({total} of {batches_per_epoch} steps, "
                        f"--max-steps {args.max_steps}) and --val-every is 0: the best checkpoint is chosen from the "
                        "start and the end only")
    return warnings


def make_scaler(enabled: bool):
    if hasattr(torch.amp, "GradScaler"):  # guarded: torch >= 2.3; torch.cuda.amp's is deprecated there
        return torch.amp.GradScaler("cuda", enabled=enabled)  # guarded
    return torch.cuda.amp.GradScaler(enabled=enabled)


def make_optimizer(named_params: list, lr: float, weight_decay: float):
    """AdamW; the weight matrices of linear maps decay (cross-attention, projections, adapters,
    LoRA, the prefix MLP). Biases, LayerNorms and the prefix's own tokens (its embedding, or its
    key/value tensor) do not: they are values, not maps, and decaying them shrinks them to nothing."""
    decay = [p for name, p in named_params if p.dim() == 2 and not name.endswith("prefix.embedding")]
    decayed = {id(p) for p in decay}
    rest = [p for _, p in named_params if id(p) not in decayed]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr)


def grad_norm(params: list) -> torch.Tensor:
    """The gradients' global L2 norm, what clip_grad_norm_ returns, with nothing clipped."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


def mean_of_others(rewards: torch.Tensor) -> torch.Tensor:
    """rewards [B, K] (K samples per image) -> each sample's baseline [B, K]: the mean reward of
    its image's other K - 1 samples (Luo 2020), so no greedy decoding is needed."""
    K = rewards.size(1)
    return (rewards.sum(1, keepdim=True) - rewards) / (K - 1)


# -- one optimisation step -------------------------------------------------------------------

# On CUDA the GradScaler skips a step whose fp16 gradients overflowed and halves its scale: from its
# start (65536) a handful of skips is normal; this many in a row is a run that has diverged.
MAX_SKIPPED_STEPS = 20


class Diverged(Exception):
    """A step's loss or gradient was not finite (on CUDA: MAX_SKIPPED_STEPS steps in a row); the step was
    not taken. The trainer reports it with the step and the last good state."""

    @classmethod
    def at_step(cls, loss: float, norm: float, lr: float, skipped: int = 0) -> "Diverged":
        return cls(f"loss {loss:.4g}, gradient norm {norm:.4g}, learning rate {lr:.4g}"
                   + (f", {skipped} steps in a row skipped by the GradScaler" if skipped else ""))



class Learner:
    """The model on its device, its optimizer, and one step of each kind on a given batch.

    Knows nothing of datasets or runs (the training benchmark drives it on made-up batches).
    """

    def __init__(self, model: Captioner, device: torch.device, args):
        self.model, self.device, self.args = model, device, args
        self.amp = device.type == "cuda"
        self.cached = bool(args.cache_features)
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named_params]
        if not self.params:
            raise ValueError("the model has no trainable parameters: call mark_trainable first")
        model.decoder.to(device)
        model.encoder.to("cpu" if self.cached else device)  # with cached features the frozen ViT is not needed
        self.tokenizer = BPETokenizer()
        self.scaler = make_scaler(self.amp)
        # torch.multinomial wants its generator on the device it samples on
        self.sampling = torch.Generator(device=device).manual_seed(args.seed + 1)
        self.optimizer = None
        self.skipped = 0  # steps in a row the GradScaler skipped

    def use_optimizer(self, lr: float, weight_decay: float) -> None:
        self.optimizer = make_optimizer(self.named_params, lr, weight_decay)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """A batch from the image source -> image tokens [B, S, W] on the device."""
        x = x.to(self.device, non_blocking=True)
        if self.cached:
            return x.float()
        with torch.no_grad(), autocast(self.device):
            return self.model.encode(x).float()

    def _update(self, loss: torch.Tensor, lr: float) -> float:
        """backward, unscale, clip, step, update, zero_grad: the standard AMP order.

        A non-finite loss or gradient raises Diverged before the step is taken. On CUDA the
        GradScaler skips such steps while it lowers its scale (normal for the first few steps, and
        now and then later); MAX_SKIPPED_STEPS of them in a row is divergence too."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        if self.args.grad_clip is None:  # clipping off: the norm is only measured (logged, checked)
            norm = grad_norm(self.params)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.args.grad_clip)
        loss, norm = loss.item(), float(norm)
        finite = math.isfinite(loss) and math.isfinite(norm)
        scaling = self.scaler.is_enabled()  # a GradScaler (CUDA's fp16) skips a few such steps by design
        if not finite and (not scaling or self.skipped + 1 >= MAX_SKIPPED_STEPS):
            self.optimizer.zero_grad(set_to_none=True)
            raise Diverged.at_step(loss, norm, lr, self.skipped + 1 if scaling else 0)
        self.scaler.step(self.optimizer)  # on CUDA a step with non-finite gradients is skipped here
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped = 0 if finite else self.skipped + 1
        return norm

    def xe_step(self, x, inp, tgt, lr: float) -> dict:
        feats = self.features(x)
        inp, tgt = inp.to(self.device), tgt.to(self.device)
        with autocast(self.device):
            logits = self.model(feats, inp)  # [B, T, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=IGNORE_INDEX,
                               label_smoothing=self.args.label_smoothing)
        return {"loss": loss.item(), "lr": lr, "grad_norm": self._update(loss, lr)}

    def scst_step(self, x, keys: list, reward: CiderD, lr: float) -> dict:
        """Self-critical step: each sample's CIDEr-D less the mean of its image's other samples
        weighs the sample's log-likelihood. B images, K samples each, N = B * K."""
        K, max_len = self.args.scst_samples, self.model.config["generation"]["max_len"]
        feats = self.features(x)  # [B, S, W]
        self.model.eval()  # the captions are made without dropout
        with torch.no_grad(), autocast(self.device):
            if self.args.scst_candidates == "beam":
                samples = self.model.decoder.beam_candidates(feats, K, max_len, EOT_ID)
            else:
                samples = self.model.decoder.sample(feats, K, max_len, EOT_ID, top_k=self.args.scst_top_k,
                                                    top_p=self.args.scst_top_p, generator=self.sampling)
        self.model.train()
        text = [tokenize(caption_text(self.tokenizer, ids)) for ids in samples]
        rewards = torch.tensor(reward.score_candidates([k for k in keys for _ in range(K)], text),
                               dtype=torch.float32).view(-1, K)  # [B, K]
        baseline = mean_of_others(rewards)
        advantage = (rewards - baseline).view(-1).to(self.device)  # [N]
        inp, tgt = make_batch(samples, ended=[len(ids) < max_len for ids in samples])
        inp, tgt = inp.to(self.device), tgt.to(self.device)  # [N, T]
        with autocast(self.device):
            logits = self.model(feats, inp)  # the image tokens [B] are shared by their K samples: [N, T, V]
        mask = tgt != IGNORE_INDEX
        logp = logits.float().log_softmax(-1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [N, T]
        loss = -(advantage.unsqueeze(1) * logp * mask).sum() / mask.sum()
        return {"loss": loss.item(), "lr": lr, "reward": float(rewards.mean()), "baseline": float(baseline.mean()),
                "positive": float((advantage > 0).float().mean()),
                "sample_logp": float((logp.detach() * mask).sum() / mask.sum()),  # per token: falls as sampling spreads out
                "grad_norm": self._update(loss, lr)}


# -- the run ----------------------------------------------------------------------------------


class IndexedImages(Dataset):
    """(image or features, index) per image: the SCST batches' keys come with them."""

    def __init__(self, images: Dataset):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], index


def run_settings(args, device: torch.device) -> dict:
    """What --resume must find unchanged: every option but RESUMABLE_CHANGES, paths made absolute."""
    settings = {k: v for k, v in vars(args).items() if k not in RESUMABLE_CHANGES}
    for name in PATH_OPTIONS:
        if settings.get(name):
            settings[name] = os.path.abspath(settings[name])
    settings["device"] = device.type  # auto, cpu, cuda: the device type decides the numbers
    if settings["max_steps"]:
        settings["epochs"] = None  # ignored: --max-steps decides the length
    return settings


def workers(args, device: torch.device) -> int:
    """--workers, or io_utils' rule for the device."""
    return args.workers if args.workers is not None else loader_workers(device)


class Trainer:
    """A whole run: the data, the phases (cross-entropy, SCST, decoding), validation, state and log.

    `Trainer.from_args(args)` checks the inputs and builds everything; `run()` goes
    through the phases from wherever the progress stands.
    """

    def __init__(self, args, model: Captioner, device: torch.device, train: Split, val: Split,
                 train_images: Dataset, val_images: Dataset):
        self.args, self.model, self.device = args, model, device
        self.learner = Learner(model, device, args)
        self.train_split, self.val_split = train, val
        self.train_images = train_images
        n_val = min(args.val_images or len(val.keys), len(val.keys))
        self.val_keys, self.val_images = val.keys[:n_val], Subset(val_images, range(n_val))
        self.workers = workers(args, device)
        self.xe_batches = math.ceil(len(train.samples) / args.batch_size)
        self.scst_batches = math.ceil(len(train.keys) / args.scst_batch_size)
        self.xe_total, self.scst_total = plan_steps(args, self.xe_batches, self.scst_batches)
        self.reward = CiderD({k: [tokenize(r) for r in train.refs[k]] for k in train.keys})
        self.val_refs = {k: [tokenize(r) for r in val.refs[k]] for k in self.val_keys}
        self.state_path, self.log_path = args.out + ".state", args.out + ".log.jsonl"
        self.settings = run_settings(args, device)
        self.data_fingerprint = train.fingerprint()  # what --resume must find unchanged, beside the settings
        # phase_step counts the phase's steps; step counts all; epoch / batch locate the next batch
        self.progress = dict(phase="xe", step=0, phase_step=0, epoch=0, batch=0, validated_step=-1,
                             best_cider=-1.0, best_step=-1, xe_best_cider=-1.0, xe_best_step=-1)
        self.best_weights = None  # the trainable tensors at the best validation so far
        self.saved_step = None  # the step OUT.state holds
        self.use_phase_optimizer()
        for message in schedule_warnings(self.xe_total, self.xe_batches, args):
            warn(message)
        grid = len(decoding_settings(args.decode_beams, args.decode_length_penalties))
        print(describe_plan(args, self.xe_total, self.xe_batches, self.scst_total, self.scst_batches, grid),
              file=sys.stderr)

    @classmethod
    def from_args(cls, args) -> "Trainer":
        """Checks the inputs (cheap ones first: the data, the decoder file, then the slow encoder),
        builds the model and the image sources, and resumes when asked."""
        torch.manual_seed(args.seed)
        outputs = {"--out": args.out}
        if args.cache_features:
            outputs["--cache-features"] = os.path.join(args.cache_features, "features.npy")
        for option, path in outputs.items():  # before minutes of loading and caching
            try:
                check_output_path(path)
            except InputError as error:
                raise InputError(f"{option}: {error}") from None
        if not os.path.isdir(args.data_root):
            raise InputError(f"--data-root {args.data_root!r} does not exist")
        tokenizer = BPETokenizer()
        train, val = Split(args.data_root, "train", tokenizer), Split(args.data_root, "val", tokenizer)
        captions = len(train.samples) + train.empty_captions
        if not train.samples:
            raise InputError(f"{args.data_root}/train.json: none of its {captions} captions has any text; "
                             "nothing to train on")
        if train.empty_captions:
            warn(f"{args.data_root}/train.json: {train.empty_captions} of {captions} captions are empty; "
                 "they are left out")
        model = build_model(args)
        print("trainable parameters by group:", file=sys.stderr)
        mark_trainable(model)
        device = pick_device(args.device)
        sources = prepare_images(train, val, model.encoder, args.cache_features, device, args.batch_size,
                                 workers(args, device), args.strict_data)
        trainer = cls(args, model, device, train, val, *sources)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        if args.resume:
            trainer.load_state()
        elif os.path.exists(trainer.state_path):
            raise InputError(f"{trainer.state_path} exists: continue that run with --resume, or choose another --out")
        return trainer

    # -- state and log ----------------------------------------------------------------------

    def trainable(self) -> dict:
        return {name: p.detach().cpu().clone() for name, p in self.learner.named_params}

    def save_state(self) -> None:
        """OUT.state, unless the weights are not finite: the last good state is never replaced by a diverged one."""
        rng = {"torch": torch.get_rng_state(), "sampling": self.learner.sampling.get_state()}
        if self.learner.amp:
            rng["cuda"] = torch.cuda.get_rng_state_all()
        log_bytes = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        trainable = self.trainable()
        if not all(torch.isfinite(t).all() for t in trainable.values()):
            raise Diverged("the trainable weights are no longer finite (not saved)")
        state = {"config": self.model.config, "settings": self.settings, "trainable": trainable,
                 "best": self.best_weights, "optimizer": self.learner.optimizer.state_dict(),
                 "scaler": self.learner.scaler.state_dict(), "progress": dict(self.progress), "rng": rng,
                 "log_bytes": log_bytes, "data": self.data_fingerprint}
        with disk_space_for(self.state_path, state):
            atomic_torch_save(state, self.state_path)
        self.saved_step = self.progress["step"]

    def load_state(self) -> None:
        if not os.path.isfile(self.state_path):
            raise InputError(f"--resume: no training state at {self.state_path}")
        state = torch_load(self.state_path)
        model_only = lambda config: {k: v for k, v in config.items() if k != "generation"}  # noqa: E731
        if model_only(state["config"]) != model_only(self.model.config):
            raise InputError(f"--resume: {self.state_path} was trained with other model settings; "
                             "resume with the interrupted run's options")
        self.model.config["generation"] = dict(state["config"]["generation"])  # chosen on validation, once done
        outside = [f"--{k.replace('_', '-')} {v!r} ({RANGES[k]})" for k, v in sorted(state["settings"].items())
                   if k in RANGES and not all(x is None or RANGES[k].holds(x)
                                              for x in (v if isinstance(v, list) else [v]))]
        if outside:
            raise InputError(f"--resume: {self.state_path} was made with settings outside their ranges: "
                             f"{'; '.join(outside)}; start a new run")
        changed = [k for k in sorted(set(state["settings"]) | set(self.settings))
                   if state["settings"].get(k) != self.settings.get(k)]
        if changed:
            was = "; ".join(f"--{k.replace('_', '-')} was {state['settings'].get(k)!r}, now {self.settings.get(k)!r}"
                            for k in changed)
            raise InputError(f"--resume: {was}. These change the run; resume with the interrupted run's values "
                             f"(only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE_CHANGES[1:])} "
                             "may differ)")
        self.check_same_data(state.get("data"), state["progress"])
        self.load_weights(state["trainable"])
        self.best_weights = state["best"]
        self.progress = dict(state["progress"])
        self.saved_step = self.progress["step"]
        self.use_phase_optimizer()
        self.learner.optimizer.load_state_dict(state["optimizer"])
        self.learner.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        self.learner.sampling.set_state(state["rng"]["sampling"])
        if self.learner.amp and "cuda" in state["rng"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if os.path.exists(self.log_path):  # what the interrupted run logged after its last state is redone
            with open(self.log_path, "r+b") as f:
                f.truncate(state["log_bytes"])
        print(f"resumed at step {self.progress['step']} ({self.progress['phase']}, epoch {self.progress['epoch']}, "
              f"batch {self.progress['batch']})", file=sys.stderr)

    def save_best(self, preds: dict) -> int:
        """The checkpoint at --out (the model as it is: the best weights) and its validation captions;
        returns the checkpoint's parameter count."""
        with disk_space_for(self.args.out, self.best_weights):
            saved = save_checkpoint(self.model, self.args.out)
        text = json.dumps(preds, indent=1, sort_keys=True) + "\n"
        with disk_space_for(self.args.out + ".val.json", text):
            atomic_write_text(self.args.out + ".val.json", text)
        return saved

    def check_same_data(self, saved: dict | None, progress: dict) -> None:
        """--resume: the training data must be what the run started with (a state from before the
        fingerprint: at least the saved position must exist in it), or the batches would differ."""
        data = self.train_split.annotations
        if saved is not None and saved != self.data_fingerprint:
            now, was = self.data_fingerprint, saved
            what = (f"now {now['captions']} captions of {now['images']} images, then {was['captions']} of "
                    f"{was['images']}" if (now["images"], now["captions"]) != (was["images"], was["captions"])
                    else f"the same counts ({now['captions']} captions of {now['images']} images), but other "
                         "image keys or captions")
            raise InputError(f"--resume: the training data changed since the run started ({data} and its "
                             f"readable images: {what}); restore it, or start a new run with another --out")
        per_epoch = {"xe": self.xe_batches, "scst": self.scst_batches}.get(progress["phase"])
        if per_epoch is not None and progress["batch"] >= per_epoch:
            raise InputError(f"--resume: {self.state_path} continues at {progress['phase']} epoch "
                             f"{progress['epoch']}, batch {progress['batch']}, but {data} now gives {per_epoch} "
                             "batches per epoch: the training data changed since the run started; restore it, "
                             "or start a new run with another --out")

    def load_weights(self, weights: dict) -> None:
        """The trainable tensors `weights` (of the state file, or the best so far) copied into the model's
        parameters in place, so the optimizer keeps its references; one InputError line for the first
        tensor that does not fit (load_state_dict would list every mismatch)."""
        params = dict(self.model.named_parameters())
        trainable = {name for name, p in params.items() if p.requires_grad}
        for name, tensor in weights.items():
            if name not in trainable or tuple(tensor.shape) != tuple(params[name].shape):
                found = f"shape {tuple(tensor.shape)}, the model's {tuple(params[name].shape)}" if name in params \
                    else "no such trainable tensor in the model"
                raise InputError(f"{self.state_path} holds weights that do not fit this model "
                                 f"({name!r}: {found}); resume with the interrupted run's options or start a new run")
        if set(weights) != trainable:
            raise InputError(f"{self.state_path} lacks {len(trainable - set(weights))} trainable tensor(s), "
                             f"e.g. {sorted(trainable - set(weights))[:3]}; start a new run")
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)

    def log(self, **record) -> None:
        record = {"step": self.progress["step"], "phase": self.progress["phase"], "time": round(time.time(), 1),
                  **record}
        line = json.dumps(record) + "\n"
        with disk_space_for(self.log_path, line), open(self.log_path, "a", encoding="utf-8") as f:
            f.write(line)

    # -- validation ------------------------------------------------------------------------------

    @torch.no_grad()
    def caption_val(self, beam_size: int, length_penalty: float = 0.0) -> dict:
        """key -> caption for the validation images, with the model as it is."""
        self.model.eval()
        captions = []
        with torch.random.fork_rng(devices=[]):  # validation leaves the training's random stream alone
            for x in tqdm(self.loader(self.val_images, self.args.batch_size), desc="validating", unit="batch",
                          file=sys.stderr, leave=False):
                with autocast(self.device):
                    ids = self.model.generate(self.learner.features(x), beam_size=beam_size,
                                              length_penalty=length_penalty)
                captions += [caption_text(self.learner.tokenizer, c) for c in ids]
        self.model.train()
        return dict(zip(self.val_keys, captions))

    def cider(self, preds: dict) -> float:
        return CiderD().compute_score(self.val_refs, {k: tokenize(c) for k, c in preds.items()})[0]

    def validate(self) -> None:
        """CIDEr-D of the validation captions (and CLIPScore); a new best is saved."""
        preds = self.caption_val(self.args.val_beam_size)
        metrics = {"val_cider": self.cider(preds)}
        if self.args.clipscore:
            scores = clip_scores(preds, self.val_split.images_dir, self.args.clip_model, self.device.type,
                                 self.args.batch_size)
            metrics["val_clipscore"] = sum(scores.values()) / len(scores)
        progress = self.progress
        progress["validated_step"] = progress["step"]
        if metrics["val_cider"] > progress["best_cider"]:
            progress.update(best_cider=metrics["val_cider"], best_step=progress["step"])
            if progress["phase"] == "xe":
                progress.update(xe_best_cider=metrics["val_cider"], xe_best_step=progress["step"])
            self.best_weights = self.trainable()
            metrics["saved"] = self.save_best(preds)
        self.log(**metrics)
        print(f"step {progress['step']}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "saved")
              + (" (best so far, saved)" if "saved" in metrics else ""), file=sys.stderr)

    # -- phases ------------------------------------------------------------------------------

    def loader(self, data, batch_size, sampler=None, collate_fn=None):
        # its own generator: creating a loader draws a worker seed, which must not move the global RNG
        return DataLoader(data, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                          num_workers=self.workers, pin_memory=self.learner.amp,
                          generator=torch.Generator().manual_seed(self.args.seed))

    def xe_phase(self) -> None:
        data = CaptionSamples(self.train_split.samples, self.train_images)

        def step(batch):
            lr = learning_rate(self.progress["phase_step"], self.xe_total, self.args)
            return self.learner.xe_step(*batch, lr=lr)

        self.train_epochs(data, self.args.batch_size, self.xe_batches, self.xe_total, step, collate_captions)

    def scst_phase(self) -> None:
        keys = self.train_split.keys

        def step(batch):
            x, index = batch
            return self.learner.scst_step(x, [keys[i] for i in index.tolist()], self.reward, self.args.scst_lr)

        self.train_epochs(IndexedImages(self.train_images), self.args.scst_batch_size, self.scst_batches,
                          self.scst_total, step)

    def train_epochs(self, data, batch_size: int, batches_per_epoch: int, total: int, step, collate_fn=None):
        """The phase's steps from where the progress stands, epoch by epoch (a fixed order per epoch,
        so a resumed run sees the batches the interrupted one would have seen)."""
        progress, args = self.progress, self.args
        bar = tqdm(desc=progress["phase"], unit="step", total=total, initial=progress["phase_step"], file=sys.stderr)
        while progress["phase_step"] < total:
            sampler = EpochSampler(len(data), args.seed, progress["epoch"], progress["batch"] * batch_size)
            if not len(sampler):  # nothing left in this epoch: the loop would never advance
                raise RuntimeError(f"{progress['phase']} epoch {progress['epoch']} has no batch {progress['batch']} "
                                   f"({batches_per_epoch} per epoch)")
            for batch in self.loader(data, batch_size, sampler, collate_fn):
                metrics = step(batch)
                progress.update(step=progress["step"] + 1, phase_step=progress["phase_step"] + 1,
                                batch=progress["batch"] + 1)
                epoch_end = progress["batch"] == batches_per_epoch
                if epoch_end:
                    progress.update(epoch=progress["epoch"] + 1, batch=0)
                if progress["step"] % args.log_every == 0 or progress["phase_step"] == 1:
                    self.log(**metrics)
                bar.update()
                bar.set_postfix({k: f"{metrics[k]:.3f}" for k in ("loss", "reward") if k in metrics})
                phase_end = progress["phase_step"] >= total
                if epoch_end or phase_end or (args.val_every and progress["step"] % args.val_every == 0):
                    self.validate()
                    self.save_state()
                elif progress["step"] % args.save_every == 0:
                    self.save_state()
                if phase_end:
                    break
        bar.close()

    def choose_decoding(self) -> None:
        """Every beam size x length penalty on the validation set with the best weights; the best
        pair (ties: the smaller beam, then the smaller penalty) goes into the saved checkpoint."""
        self.load_weights(self.best_weights)
        rows = []
        for beam, penalty in decoding_settings(self.args.decode_beams, self.args.decode_length_penalties):
            preds = self.caption_val(beam, penalty)
            rows.append({"beam_size": beam, "length_penalty": penalty, "cider": self.cider(preds), "preds": preds})
        best = max(rows, key=lambda r: (r["cider"], -r["beam_size"], -r["length_penalty"]))
        self.model.config["generation"].update(beam_size=best["beam_size"], length_penalty=best["length_penalty"])
        self.save_best(best["preds"])
        grid = [{k: r[k] for k in ("beam_size", "length_penalty", "cider")} for r in rows]
        self.log(decoding_grid=grid, chosen={k: best[k] for k in ("beam_size", "length_penalty", "cider")})
        print(decoding_table(grid, best), file=sys.stderr)

    def next_phase(self) -> None:
        """The one place phases change: xe -> scst (from the best weights) -> decode -> done."""
        phase = self.progress["phase"]
        if phase == "xe" and self.scst_total:
            self.load_weights(self.best_weights)
            following = "scst"
        elif phase in ("xe", "scst"):
            following = "decode"
        else:
            following = "done"
        self.progress.update(phase=following, phase_step=0, epoch=0, batch=0)
        if following == "scst":
            self.use_phase_optimizer()
        self.save_state()

    def use_phase_optimizer(self) -> None:
        """A fresh optimizer for the phase the progress is in: cross-entropy's with --weight-decay,
        SCST's without (short, small updates from the best weights, which decay would pull away)."""
        if self.progress["phase"] == "scst":
            self.learner.use_optimizer(self.args.scst_lr, 0.0)
        else:
            self.learner.use_optimizer(self.args.lr, self.args.weight_decay)

    def run(self) -> None:
        if self.progress["validated_step"] < 0:
            self.validate()  # the starting point: GPT-2 with fresh (identity) new modules
            self.save_state()
        phases = {"xe": self.xe_phase, "scst": self.scst_phase, "decode": self.choose_decoding}
        while self.progress["phase"] != "done":
            phases[self.progress["phase"]]()
            self.next_phase()
        p = self.progress
        print(f"best validation CIDEr {p['best_cider']:.4f} at step {p['best_step']} (cross-entropy best "
              f"{p['xe_best_cider']:.4f} at step {p['xe_best_step']}); checkpoint {self.args.out}", file=sys.stderr)
        for split in (self.train_split, self.val_split):
            if split.skipped:
                print(f"skipped {len(split.skipped)} unreadable {split.name} image(s) and their "
                      f"{split.dropped_captions} caption(s) (named in the warnings at the start)", file=sys.stderr)
        if p["best_step"] == 0 and p["step"] > 0:
            message = (f"no training step improved on the untrained model: the best validation CIDEr is step 0's, "
                       f"so {self.args.out} holds the UNTRAINED model (GPT-2 with its new modules at their start) "
                       f"after {p['step']} steps. Look at the losses in {self.log_path}; a smaller --lr or a longer "
                       "run may help")
            warn(message)
            self.log(warning=message)


def decoding_settings(beams: list, penalties: list) -> list:
    """The grid's distinct (beam size, length penalty) pairs, in order. A length penalty only ranks
    finished beams against each other, so greedy decoding (beam 1) is one pass whatever the penalty:
    it is tried once, with the smallest penalty given."""
    pairs = []
    for beam in sorted(set(beams)):
        pairs += [(beam, penalty) for penalty in (sorted(set(penalties)) if beam > 1 else [min(penalties)])]
    return pairs


def decoding_table(grid: list, best: dict) -> str:
    """The decoding grid as a markdown table, the chosen pair marked."""
    lines = ["| beam | length penalty | validation CIDEr |", "|---:|---:|---:|"]
    for r in grid:
        mark = " (chosen)" if (r["beam_size"], r["length_penalty"]) == (best["beam_size"], best["length_penalty"]) else ""
        lines.append(f"| {r['beam_size']} | {r['length_penalty']:g} | {r['cider']:.4f}{mark} |")
    return "\n".join(lines)


# -- the run's files: its lock, a full disk, the inputs it must not replace ------------------------


class DiskFull(Exception):
    def __init__(self, path: str, needed: int):
        folder = os.path.dirname(os.path.abspath(path))
        mount = folder
        while not os.path.ismount(mount) and os.path.dirname(mount) != mount:
            mount = os.path.dirname(mount)
        free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
        super().__init__(f"no space left on {mount} writing {path} ({math.ceil(needed / 2 ** 20)} MB needed, "
                         f"{free // 2 ** 20} MB free)")


def bytes_of(obj) -> int:
    """About what writing `obj` takes: its tensors' bytes (or a text's), through dicts and lists."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(bytes_of(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(bytes_of(v) for v in obj)
    return len(obj.encode()) if isinstance(obj, str) else 64


@contextlib.contextmanager
def disk_space_for(path: str, obj):
    """A full disk while writing `path` (the atomic writers leave the old file in place) becomes DiskFull.
    torch.save reports it as a RuntimeError from its zip writer ("enforce fail ... file write failed"):
    a RuntimeError while the disk has less free space than `obj` needs counts as a full disk too."""
    needed = bytes_of(obj)
    try:
        yield
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        raise DiskFull(path, needed) from None
    except RuntimeError:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder) or shutil.disk_usage(folder).free >= needed:
            raise
        raise DiskFull(path, needed) from None


class RunLock:
    """OUT.lock, holding the process id of the run writing OUT and its files: a second run with the same
    --out is refused while the first lives. A lock whose process has ended (a killed run) or that holds
    no process id is taken over. Removed when the run ends."""

    def __init__(self, out: str):
        self.out, self.path, self.held = out, out + ".lock", False

    def owner(self):
        """The process id in the lock file, or None when it holds none (empty, damaged, gone)."""
        try:
            with open(self.path, "rb") as f:
                text = f.read(32).decode("ascii", "replace").strip()
        except OSError:
            return None
        return int(text) if text.isdigit() and 0 < int(text) < 2 ** 31 else None

    def __enter__(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = self.owner()
                if pid is not None and pid != os.getpid() and process_exists(pid):
                    raise InputError(f"another p2_train.py run (process {pid}) is writing {self.out} (its lock: "
                                     f"{self.path}); wait for it to end, or choose another --out") from None
                with contextlib.suppress(FileNotFoundError):  # stale: its run has ended
                    os.unlink(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            self.held = True
            return self
        raise InputError(f"could not take the lock {self.path}: other runs keep creating it")

    def __exit__(self, *exc):
        if self.held and self.owner() == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.held = False


def check_outputs(args) -> None:
    """Before any work: --out and the files beside it can be written (a name that fits NAME_MAX with
    its suffix too), and none of them is one of the run's inputs."""
    outputs = {"--out": args.out, "--out's training state": args.out + ".state",
               "--out's log": args.out + ".log.jsonl", "--out's validation captions": args.out + ".val.json",
               "--out's lock": args.out + ".lock"}
    for label, path in outputs.items():
        try:
            check_output_path(path)
        except InputError as error:
            longest = max(len(path) for path in outputs.values()) - len(args.out)
            hint = f" (the files beside --out add up to {longest} bytes to its name)" if "bytes long" in str(error) else ""
            raise InputError(f"{label}: {error}{hint}") from None
    vocabulary = find_vocab_dir()
    inputs = {"--decoder-weights": args.decoder_weights,
              "--encoder-weights" if args.encoder_weights else "the encoder's cached weights":
                  args.encoder_weights or cached_weights_path(args.encoder),
              "--clip-model": args.clip_model if args.clipscore and os.path.isfile(args.clip_model) else None,
              "GPT-2 vocabulary": os.path.join(vocabulary, "encoder.json"),
              "GPT-2 merges": os.path.join(vocabulary, "vocab.bpe")}
    for split in ("train", "val"):
        inputs[f"--data-root's {split}.json"] = os.path.join(args.data_root, split + ".json")
        inputs[f"--data-root's {split} images"] = os.path.join(args.data_root, "images", split)
    check_outputs_spare_inputs(outputs, inputs)


def resume_command(argv: list) -> str:
    script = sys.argv[0] if os.path.basename(sys.argv[0]) == "p2_train.py" else "p2_train.py"
    return shlex.join(["python3", script, *argv, *([] if "--resume" in argv else ["--resume"])])


def kept_state(args, trainer) -> str:
    """Where the run can continue from, in words."""
    if trainer is not None and trainer.saved_step is not None:
        return f"its state at step {trainer.saved_step} is kept in {trainer.state_path}"
    if os.path.isfile(args.out + ".state"):
        return f"its state is kept in {args.out}.state"
    return "no training state was saved yet: nothing to resume, start the run again"


def main(argv=None) -> None:
    quiet_known_warnings()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse_args(argv)
    trainer = None
    try:
        if args.print_params:
            print_params(args)
            return
        check_outputs(args)
        with RunLock(args.out):
            trainer = Trainer.from_args(args)
            trainer.run()
    except KeyboardInterrupt:
        where = ("" if trainer is None else
                 f" at step {trainer.progress['step']} ({PHASE_NAMES[trainer.progress['phase']]})")
        kept = kept_state(args, trainer)
        print(f"\ninterrupted{where}: {kept}" + ("" if kept.startswith("no ") else
                                                  f"; continue with:\n  {resume_command(argv)}"), file=sys.stderr)
        raise SystemExit(130) from None
    except Diverged as error:
        p = trainer.progress
        message = (f"training diverged at step {p['step'] + 1} ({PHASE_NAMES[p['phase']]}): {error}; the step was "
                   f"not taken. {kept_state(args, trainer).capitalize()}: continue with --resume and a smaller "
                   f"--lr / --scst-lr (or --grad-clip); {args.out} holds the best validated weights "
                   f"(step {p['best_step']})")
        with contextlib.suppress(OSError, DiskFull):
            trainer.log(error=message)
        raise SystemExit("error: " + message) from None
    except DiskFull as error:
        raise SystemExit(f"error: {error}; the file it replaces is unchanged and "
                         f"{kept_state(args, trainer)}: free some space, then continue with --resume") from None
    except (InputError, FileNotFoundError, ValueError) as error:
        if trainer is not None and not isinstance(error, InputError):
            raise  # a bug in the run, not a bad input
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
