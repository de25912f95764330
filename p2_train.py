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
validation and the decoding grid may change.

A shorter run: --epochs N or --max-steps N; the warm-up (--warmup-fraction of
the run, at most --warmup-steps) and the cosine decay follow it. For a quick
look, add --val-every so that the best checkpoint is chosen from more than
the epoch ends, and --scst-epochs 0 --decode-beams 1 to skip the later phases.

    python3 p2_train.py --print-params --peft lora      # trainable count, no data needed
"""
from __future__ import annotations

import argparse
import json
import math
import os
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
from encoder import DEFAULT_ENCODER
from clipscore import clip_scores
from file_io import atomic_torch_save, atomic_write_text, check_output_path
from io_utils import InputError, loader_workers, pick_device, quiet_known_warnings, warn
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
from tokenizer import EOT_ID, BPETokenizer

# Options --resume lets change: they decide what is logged, saved or measured, never a training step.
RESUMABLE_CHANGES = ("resume", "log_every", "save_every", "workers", "val_every", "val_images", "val_beam_size",
                     "clipscore", "clip_model", "decode_beams", "decode_length_penalties", "strict_data")
PATH_OPTIONS = ("data_root", "decoder_weights", "encoder_weights", "cache_features")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("data and files")
    io.add_argument("--data-root", help="course layout: images/train/, images/val/, train.json, val.json")
    io.add_argument("--decoder-weights", help="the course's decoder_model.bin (GPT-2)")
    io.add_argument("--out", help="best checkpoint by validation CIDEr; OUT.state / OUT.log.jsonl beside it")
    io.add_argument("--resume", action="store_true",
                    help="continue the run whose OUT.state exists, with its settings (only logging, saving, "
                         "validation and --decode-* options may differ)")
    io.add_argument("--cache-features", metavar="DIR",
                    help="store the frozen encoder's features (fp16) here once; later epochs skip the ViT")
    io.add_argument("--strict-data", action="store_true",
                    help="an image that cannot be read is an error before training (default: off, it is skipped "
                         "with a warning, its captions left out, and counted in the summary)")
    io.add_argument("--print-params", action="store_true",
                    help="build the model (random weights unless files are given), print trainable counts, exit")

    model = p.add_argument_group("model")
    model.add_argument("--peft", choices=sorted(PEFT_PRESETS), default="adapter",
                       help="PEFT preset; the options below override its values")
    model.add_argument("--encoder", default=DEFAULT_ENCODER, help="timm ViT name (default %(default)s)")
    model.add_argument("--encoder-weights", help="local encoder weights file (default: repository cache or timm)")
    model.add_argument("--encoder-kwargs", type=json.loads, default=None,
                       help="JSON of extra timm.create_model arguments (e.g. a small ViT for tests)")
    model.add_argument("--cross-layers", type=int, nargs="+", help="blocks with cross-attention (default all)")
    model.add_argument("--adapter-dim", type=int, help="adapter bottleneck width (adapter preset: 128)")
    model.add_argument("--adapter-places", nargs="+", choices=["attn", "mlp"], help="default: attn mlp")
    model.add_argument("--adapter-layers", type=int, nargs="+", help="blocks with adapters (default all)")
    model.add_argument("--prefix-len", type=int, help="prefix tokens per layer (prefix preset: 64)")
    model.add_argument("--prefix-hidden", type=int, help="reparameterisation MLP width while training; 0 = none")
    model.add_argument("--lora-rank", type=int, help="LoRA rank (lora preset: 32)")
    model.add_argument("--lora-alpha", type=float, help="LoRA alpha; the update is scaled by alpha / rank")
    model.add_argument("--lora-targets", nargs="+", choices=list(LORA_TARGETS), help="default: all four")
    model.add_argument("--lora-dropout", type=float)

    opt = p.add_argument_group("cross-entropy phase (defaults: the full data on one 2080 Ti)")
    opt.add_argument("--epochs", type=int, default=5, help="epochs over all captions (%(default)s)")
    opt.add_argument("--max-steps", type=int, default=0,
                     help="end the phase after this many steps (0: all epochs); the schedule follows it")
    opt.add_argument("--batch-size", type=int, default=64)
    opt.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    opt.add_argument("--min-lr-ratio", type=float, default=0.05, help="cosine floor, as a fraction of --lr")
    opt.add_argument("--warmup-fraction", type=float, default=0.1, help="warm-up, as a fraction of the phase")
    opt.add_argument("--warmup-steps", type=int, default=500, help="the most warm-up steps")
    opt.add_argument("--weight-decay", type=float, default=0.01)
    opt.add_argument("--label-smoothing", type=float, default=0.0)
    opt.add_argument("--grad-clip", type=float, default=1.0)
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    opt.add_argument("--workers", type=int, default=None, help="data loading processes (default 4 on CUDA)")

    scst = p.add_argument_group("self-critical phase (from the best cross-entropy weights)")
    scst.add_argument("--scst-epochs", type=int, default=1, help="epochs over the training images; 0 skips it")
    scst.add_argument("--scst-max-steps", type=int, default=0, help="end the phase after this many steps (0: all)")
    scst.add_argument("--scst-lr", type=float, default=1e-5, help="constant learning rate")
    scst.add_argument("--scst-batch-size", type=int, default=16, help="images per step")
    scst.add_argument("--scst-candidates", choices=("beam", "sample"), default="beam",
                      help="each image's captions: the final beams of a beam search as wide as --scst-samples (what "
                           "decoding chooses among; on the synthetic set the steadiest held-out gain, "
                           "bench/RESULTS.md), or sampled with --scst-top-k / --scst-top-p")
    scst.add_argument("--scst-samples", type=int, default=5, help="captions per image (>= 2)")
    scst.add_argument("--scst-top-k", type=int, default=None,
                      help="sampling only: among the k likeliest tokens (0: all; default 2: samples near the greedy "
                           "caption, so the update improves what decoding outputs; with 5 SCST lowered held-out "
                           "greedy CIDEr on the synthetic set, bench/RESULTS.md)")
    scst.add_argument("--scst-top-p", type=float, default=None,
                      help="sampling only: nucleus, the likeliest tokens holding p (default 1: all)")

    gen = p.add_argument_group("decoding (chosen on validation after training, stored in the checkpoint)")
    gen.add_argument("--max-len", type=int, default=30, help="most tokens per caption")
    gen.add_argument("--decode-beams", type=int, nargs="+", default=[1, 3, 5],
                     help="beam sizes tried (%(default)s; 5 is the largest the inference benchmark is sized for)")
    gen.add_argument("--decode-length-penalties", type=float, nargs="+", default=[0.0, 0.5, 1.0],
                     help="length penalties tried: beam score / (length + 1) ** this (%(default)s)")

    val = p.add_argument_group("validation and logging (may change on --resume)")
    val.add_argument("--val-every", type=int, default=0, help="validate every N steps too (0: at epoch ends)")
    val.add_argument("--val-images", type=int, default=0, help="validate on the first N images (0: all)")
    val.add_argument("--val-beam-size", type=int, default=1, help="beam size while validating (1: greedy)")
    val.add_argument("--clipscore", action="store_true", help="also compute CLIPScore (CLIP ViT-B/32) when validating")
    val.add_argument("--clip-model", default="ViT-B/32", help="CLIP for --clipscore (name or file)")
    val.add_argument("--save-every", type=int, default=500, help="save the resumable state every N steps")
    val.add_argument("--log-every", type=int, default=50)
    args = p.parse_args(argv)
    if not args.print_params:
        missing = [f"--{n.replace('_', '-')}" for n in ("data_root", "decoder_weights", "out") if not getattr(args, n)]
        if missing:
            p.error("the following arguments are required: " + ", ".join(missing))
    sampling = {"scst_top_k": 2, "scst_top_p": 1.0}  # the sampling options and their defaults
    for name, default in sampling.items():
        if args.scst_candidates == "beam" and getattr(args, name) is not None:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} has no effect with --scst-candidates beam "
                    "(the default): add --scst-candidates sample to sample the captions")
        if args.scst_candidates == "sample" and getattr(args, name) is None:
            setattr(args, name, default)
    at_least = dict(batch_size=1, epochs=0, max_steps=0, warmup_steps=0, scst_epochs=0, scst_max_steps=0,
                    scst_batch_size=1, scst_samples=2, max_len=1, val_every=0, val_images=0,
                    val_beam_size=1, save_every=1, log_every=1)
    for name, low in at_least.items():
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if not 0.0 <= args.warmup_fraction <= 1.0:
        p.error(f"--warmup-fraction must be within [0, 1], got {args.warmup_fraction}")
    if args.scst_candidates == "sample" and args.scst_top_k < 0:
        p.error(f"--scst-top-k must be >= 0, got {args.scst_top_k}")
    if args.scst_candidates == "sample" and not 0.0 < args.scst_top_p <= 1.0:
        p.error(f"--scst-top-p must be within (0, 1], got {args.scst_top_p}")
    # the decoding grid runs only after training: a value it cannot take must fail now
    for name, values, low, high in (("decode_beams", args.decode_beams, 1, MAX_BEAM),
                                    ("val_beam_size", [args.val_beam_size], 1, MAX_BEAM),
                                    ("decode_length_penalties", args.decode_length_penalties, 0, MAX_LENGTH_PENALTY)):
        if not all(low <= v <= high for v in values):
            p.error(f"--{name.replace('_', '-')} must be within {low}..{high:g}, got {values}")
    return args


def build_config(args) -> dict:
    return make_config(
        args.peft, encoder=args.encoder, encoder_kwargs=args.encoder_kwargs,
        generation=dict(beam_size=args.decode_beams[0], max_len=args.max_len,
                        length_penalty=args.decode_length_penalties[0]),
        cross_layers=args.cross_layers, adapter_dim=args.adapter_dim, adapter_places=args.adapter_places,
        adapter_layers=args.adapter_layers, prefix_len=args.prefix_len, prefix_hidden=args.prefix_hidden,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=args.lora_targets,
        lora_dropout=args.lora_dropout)


def print_params(args) -> None:
    model = Captioner(build_config(args), args.decoder_weights, args.encoder_weights,
                      pretrained_encoder=args.encoder_weights is not None)
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
        warnings.append(f"--max-steps {args.max_steps} ends the run inside its first epoch ({batches_per_epoch} "
                        "steps) and --val-every is 0: the best checkpoint is chosen from the start and the end only")
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


def mean_of_others(rewards: torch.Tensor) -> torch.Tensor:
    """rewards [B, K] (K samples per image) -> each sample's baseline [B, K]: the mean reward of
    its image's other K - 1 samples (Luo 2020), so no greedy decoding is needed."""
    K = rewards.size(1)
    return (rewards.sum(1, keepdim=True) - rewards) / (K - 1)


# -- one optimisation step -------------------------------------------------------------------


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
        """backward, unscale, clip, step, update, zero_grad: the standard AMP order."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.args.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

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
        self.xe_total = phase_steps(args.epochs, self.xe_batches, args.max_steps)
        self.scst_total = phase_steps(args.scst_epochs, self.scst_batches, args.scst_max_steps)
        self.reward = CiderD({k: [tokenize(r) for r in train.refs[k]] for k in train.keys})
        self.val_refs = {k: [tokenize(r) for r in val.refs[k]] for k in self.val_keys}
        self.state_path, self.log_path = args.out + ".state", args.out + ".log.jsonl"
        self.settings = run_settings(args, device)
        self.data_fingerprint = train.fingerprint()  # what --resume must find unchanged, beside the settings
        # phase_step counts the phase's steps; step counts all; epoch / batch locate the next batch
        self.progress = dict(phase="xe", step=0, phase_step=0, epoch=0, batch=0, validated_step=-1,
                             best_cider=-1.0, best_step=-1, xe_best_cider=-1.0, xe_best_step=-1)
        self.best_weights = None  # the trainable tensors at the best validation so far
        self.use_phase_optimizer()
        for message in schedule_warnings(self.xe_total, self.xe_batches, args):
            warn(message)

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
        model = Captioner(build_config(args), args.decoder_weights, args.encoder_weights)
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
        rng = {"torch": torch.get_rng_state(), "sampling": self.learner.sampling.get_state()}
        if self.learner.amp:
            rng["cuda"] = torch.cuda.get_rng_state_all()
        log_bytes = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        atomic_torch_save({"config": self.model.config, "settings": self.settings, "trainable": self.trainable(),
                           "best": self.best_weights, "optimizer": self.learner.optimizer.state_dict(),
                           "scaler": self.learner.scaler.state_dict(), "progress": dict(self.progress), "rng": rng,
                           "log_bytes": log_bytes, "data": self.data_fingerprint}, self.state_path)

    def load_state(self) -> None:
        if not os.path.isfile(self.state_path):
            raise InputError(f"--resume: no training state at {self.state_path}")
        state = torch_load(self.state_path)
        model_only = lambda config: {k: v for k, v in config.items() if k != "generation"}  # noqa: E731
        if model_only(state["config"]) != model_only(self.model.config):
            raise InputError(f"--resume: {self.state_path} was trained with other model settings; "
                             "resume with the interrupted run's options")
        self.model.config["generation"] = dict(state["config"]["generation"])  # chosen on validation, once done
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
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if unexpected or set(missing) & set(weights) or len(weights) != len(self.learner.params):
            raise InputError(f"weights do not fit the model (unexpected {unexpected[:5]})")

    def log(self, **record) -> None:
        record = {"step": self.progress["step"], "phase": self.progress["phase"], "time": round(time.time(), 1),
                  **record}
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

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
            metrics["saved"] = save_checkpoint(self.model, self.args.out)
            atomic_write_text(self.args.out + ".val.json", json.dumps(preds, indent=1, sort_keys=True) + "\n")
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
        for beam in self.args.decode_beams:
            for penalty in self.args.decode_length_penalties:
                preds = self.caption_val(beam, penalty)
                rows.append({"beam_size": beam, "length_penalty": penalty, "cider": self.cider(preds), "preds": preds})
        best = max(rows, key=lambda r: (r["cider"], -r["beam_size"], -r["length_penalty"]))
        self.model.config["generation"].update(beam_size=best["beam_size"], length_penalty=best["length_penalty"])
        save_checkpoint(self.model, self.args.out)
        atomic_write_text(self.args.out + ".val.json", json.dumps(best["preds"], indent=1, sort_keys=True) + "\n")
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


def decoding_table(grid: list, best: dict) -> str:
    """The decoding grid as a markdown table, the chosen pair marked."""
    lines = ["| beam | length penalty | validation CIDEr |", "|---:|---:|---:|"]
    for r in grid:
        mark = " (chosen)" if (r["beam_size"], r["length_penalty"]) == (best["beam_size"], best["length_penalty"]) else ""
        lines.append(f"| {r['beam_size']} | {r['length_penalty']:g} | {r['cider']:.4f}{mark} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    quiet_known_warnings()
    args = parse_args(argv)
    try:
        if args.print_params:
            print_params(args)
            return
        trainer = Trainer.from_args(args)
    except (InputError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    trainer.run()


if __name__ == "__main__":
    main()
