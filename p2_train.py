"""Problem 2: train the captioner (frozen ViT + GPT-2 with cross-attention and PEFT).

    python3 p2_train.py --data-root hw3_data/p2_data --decoder-weights hw3_data/p2_data/decoder_model.bin \\
        --peft adapter --out checkpoints/adapter.pt --cache-features cache/features

Cross-entropy on every caption (the course's alignment, p2_data.py), AdamW
with warm-up then cosine decay, fp16 autocast + GradScaler on CUDA, then
optionally self-critical sequence training (--scst-epochs): captions sampled
from the model, rewarded by CIDEr-D against the references (document
frequencies from the training set), greedy captions as the baseline (Rennie
et al. 2017). Validation CIDEr (in-process, equal to coco-caption's on the
same tokens) every epoch; the best checkpoint by it is kept at --out, as
`{config, state_dict}` with the trainable tensors only.

Files next to --out: OUT.state (everything --resume needs: trainable
tensors, optimizer, scaler, progress, RNG), OUT.log.jsonl (loss, learning
rate, metrics), OUT.val.json (the best validation captions). All written
atomically; an interrupted run continues with --resume and loses nothing.

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
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioner import (
    EOT,
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
from io_utils import atomic_torch_save, atomic_write_text, torch_load
from p2_data import (
    IGNORE_INDEX,
    CaptionSamples,
    EpochSampler,
    FeatureCache,
    ImageFiles,
    Split,
    collate_captions,
    make_batch,
)
from p2_evaluate import InputError, clip_scores, resolve_device
from tokenizer import BPETokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("data and files")
    io.add_argument("--data-root", help="course layout: images/train/, images/val/, train.json, val.json")
    io.add_argument("--decoder-weights", help="the course's decoder_model.bin (GPT-2)")
    io.add_argument("--out", help="best checkpoint by validation CIDEr; OUT.state / OUT.log.jsonl beside it")
    io.add_argument("--resume", action="store_true", help="continue the run whose OUT.state exists")
    io.add_argument("--cache-features", metavar="DIR",
                    help="store the frozen encoder's features (fp16) here once; later epochs skip the ViT")
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

    gen = p.add_argument_group("decoding (stored in the checkpoint; inference uses it)")
    gen.add_argument("--beam-size", type=int, default=5)
    gen.add_argument("--max-len", type=int, default=30, help="most tokens per caption")
    gen.add_argument("--length-penalty", type=float, default=0.0, help="beam score / (length + 1) ** this")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=5, help="cross-entropy epochs over all captions")
    opt.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in all (smoke runs)")
    opt.add_argument("--batch-size", type=int, default=64)
    opt.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    opt.add_argument("--min-lr-ratio", type=float, default=0.05, help="cosine floor, as a fraction of --lr")
    opt.add_argument("--warmup-steps", type=int, default=500)
    opt.add_argument("--weight-decay", type=float, default=0.01)
    opt.add_argument("--label-smoothing", type=float, default=0.0)
    opt.add_argument("--grad-clip", type=float, default=1.0)
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    opt.add_argument("--workers", type=int, default=None, help="data loading processes (default 4 on CUDA)")

    scst = p.add_argument_group("self-critical sequence training (after the cross-entropy epochs)")
    scst.add_argument("--scst-epochs", type=int, default=1, help="0 disables")
    scst.add_argument("--scst-lr", type=float, default=1e-5)
    scst.add_argument("--scst-batch-size", type=int, default=16, help="images per step")
    scst.add_argument("--scst-samples", type=int, default=5, help="sampled captions per image")

    val = p.add_argument_group("validation")
    val.add_argument("--val-every", type=int, default=0, help="validate every N steps too (0: once per epoch)")
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
    for name in ("batch_size", "epochs", "beam_size", "max_len", "scst_batch_size", "scst_samples", "val_beam_size"):
        if getattr(args, name) < (0 if name == "epochs" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def build_config(args) -> dict:
    return make_config(
        args.peft, encoder=args.encoder, encoder_kwargs=args.encoder_kwargs,
        generation=dict(beam_size=args.beam_size, max_len=args.max_len, length_penalty=args.length_penalty),
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


def learning_rate(step: int, total: int, args) -> float:
    """Linear warm-up to --lr, then cosine decay to --lr * --min-lr-ratio at `total`."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, total - args.warmup_steps))
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scaler(enabled: bool):
    if hasattr(torch.amp, "GradScaler"):  # guarded: torch >= 2.3; torch.cuda.amp's is deprecated there
        return torch.amp.GradScaler("cuda", enabled=enabled)  # guarded
    return torch.cuda.amp.GradScaler(enabled=enabled)


def make_optimizer(params, lr: float, weight_decay: float):
    """AdamW; matrices decay, biases, norms, gates and prefixes do not."""
    decay = [p for p in params if p.dim() == 2]
    rest = [p for p in params if p.dim() != 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr)


class Trainer:
    """The optimisation state and the steps; `from_args` adds the data and a resumable run.

    Built directly (`Trainer(args, model, steps_per_epoch)`) it can take steps
    on batches it is given (the training benchmark does); `run` needs
    `from_args`.
    """

    def __init__(self, args, model: Captioner, steps_per_epoch: int):
        self.args = args
        self.device = torch.device(resolve_device(args.device))
        self.amp = self.device.type == "cuda"
        self.workers = args.workers if args.workers is not None else (4 if self.amp else 0)
        self.tokenizer = BPETokenizer()
        self.model, self.config = model, model.config
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters: call mark_trainable first")
        # with cached features the frozen ViT is not needed on the GPU
        model.decoder.to(self.device)
        model.encoder.to("cpu" if args.cache_features else self.device)
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = args.epochs * steps_per_epoch
        self.optimizer = make_optimizer(self.params, args.lr, args.weight_decay)
        self.scaler = make_scaler(self.amp)
        # torch.multinomial wants its generator on the device it samples on
        self.scst_generator = torch.Generator(device=self.device).manual_seed(args.seed + 1)
        self.progress = dict(phase="xe", epoch=0, batch=0, step=0, best_cider=-1.0, best_step=-1)

    @classmethod
    def from_args(cls, args) -> "Trainer":
        """Checks the inputs (cheap ones first: the data, the decoder file, then the slow encoder),
        builds the model and the image sources, and resumes when asked."""
        torch.manual_seed(args.seed)
        if not os.path.isdir(args.data_root):
            raise InputError(f"--data-root {args.data_root!r} does not exist")
        tokenizer = BPETokenizer()
        train_split = Split(args.data_root, "train", tokenizer)
        val_split = Split(args.data_root, "val", tokenizer)
        if args.val_images:
            val_split.keys = val_split.keys[:args.val_images]
            val_split.paths = val_split.paths[:args.val_images]
        model = Captioner(build_config(args), args.decoder_weights, args.encoder_weights)
        print("trainable parameters by group:", file=sys.stderr)
        mark_trainable(model)
        device = torch.device(resolve_device(args.device))
        workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)

        def image_source(split):
            if args.cache_features:
                return FeatureCache(args.cache_features, model.encoder, split, device, args.batch_size, workers)
            return ImageFiles(split.paths, model.encoder.transform)

        train_images, val_images = image_source(train_split), image_source(val_split)
        trainer = cls(args, model, math.ceil(len(train_split.samples) / args.batch_size))
        trainer.train_split, trainer.val_split = train_split, val_split
        trainer.train_images, trainer.val_images = train_images, val_images
        trainer.state_path, trainer.log_path = args.out + ".state", args.out + ".log.jsonl"
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        if args.resume:
            trainer._load_state()
        elif os.path.exists(trainer.state_path):
            raise InputError(f"{trainer.state_path} exists: continue that run with --resume, or choose another --out")
        return trainer

    def _loader(self, data, batch_size, sampler=None, collate_fn=None):
        # its own generator: creating a loader draws a worker seed, which must not move the global RNG
        return DataLoader(data, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                          num_workers=self.workers, pin_memory=self.amp,
                          generator=torch.Generator().manual_seed(self.args.seed))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """A batch from the image source -> image tokens [B, S, W] on the device."""
        x = x.to(self.device, non_blocking=True)
        if self.args.cache_features:
            return x.float()
        with autocast(self.device):
            return self.model.encode(x).float()

    # -- state -----------------------------------------------------------------

    def _save_state(self) -> None:
        state = {name: p.detach().cpu() for name, p in self.model.named_parameters() if p.requires_grad}
        rng = {"torch": torch.get_rng_state(), "scst": self.scst_generator.get_state()}
        if self.amp:
            rng["cuda"] = torch.cuda.get_rng_state_all()
        atomic_torch_save({"config": self.config, "trainable": state, "optimizer": self.optimizer.state_dict(),
                           "scaler": self.scaler.state_dict(), "progress": dict(self.progress), "rng": rng},
                          self.state_path)

    def _load_state(self) -> None:
        if not os.path.isfile(self.state_path):
            raise InputError(f"--resume: no training state at {self.state_path}")
        state = torch_load(self.state_path)
        if state["config"] != self.config:
            raise InputError(f"--resume: {self.state_path} was trained with other model settings; "
                             "resume with the interrupted run's options")
        missing, unexpected = self.model.load_state_dict(state["trainable"], strict=False)
        if unexpected or set(missing) & set(state["trainable"]):
            raise InputError(f"--resume: state does not fit the model (unexpected {unexpected[:5]})")
        self.progress = dict(state["progress"])
        if self.progress["phase"] == "scst":
            self.optimizer = make_optimizer(self.params, self.args.scst_lr, 0.0)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        self.scst_generator.set_state(state["rng"]["scst"])
        if self.amp and "cuda" in state["rng"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        print(f"resumed at step {self.progress['step']} ({self.progress['phase']}, epoch {self.progress['epoch']}, "
              f"batch {self.progress['batch']})", file=sys.stderr)

    def log(self, **record) -> None:
        record = {"step": self.progress["step"], "phase": self.progress["phase"], "time": round(time.time(), 1),
                  **record}
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # -- validation --------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> None:
        """Captions for the validation images, CIDEr-D in-process (and CLIPScore); keep the best model."""
        if self.progress.get("validated_step") == self.progress["step"]:
            return  # an epoch end, --val-every and --max-steps may fall on one step
        self.progress["validated_step"] = self.progress["step"]
        split, model = self.val_split, self.model
        model.eval()
        with torch.random.fork_rng(devices=[]):  # validation leaves the training's random stream alone
            loader = self._loader(self.val_images, self.args.batch_size)
            captions = []
            for x in tqdm(loader, desc="validating", unit="batch", file=sys.stderr, leave=False):
                feats = self.features(x)
                with autocast(self.device):
                    ids = model.generate(feats, beam_size=self.args.val_beam_size)
                captions += [caption_text(self.tokenizer, c) for c in ids]
        model.train()
        preds = dict(zip(split.keys, captions))
        refs = {k: [tokenize(r) for r in split.refs[k]] for k in split.keys}
        cider, _ = CiderD().compute_score(refs, {k: tokenize(c) for k, c in preds.items()})
        metrics = {"val_cider": cider}
        if self.args.clipscore:
            scores = clip_scores(preds, split.images_dir, self.args.clip_model, self.device.type, self.args.batch_size)
            metrics["val_clipscore"] = sum(scores.values()) / len(scores)
        if cider > self.progress["best_cider"]:
            self.progress.update(best_cider=cider, best_step=self.progress["step"])
            size = save_checkpoint(model, self.args.out)
            atomic_write_text(self.args.out + ".val.json", json.dumps(preds, indent=1, sort_keys=True) + "\n")
            metrics["saved"] = size
        self.log(**metrics)
        print(f"step {self.progress['step']}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                             if k != "saved")
              + (" (best so far, saved)" if "saved" in metrics else ""), file=sys.stderr)
        self._save_state()

    # -- steps --------------------------------------------------------------------

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

    def xe_step(self, x, inp, tgt) -> dict:
        feats = self.features(x)
        inp, tgt = inp.to(self.device), tgt.to(self.device)
        with autocast(self.device):
            logits = self.model(feats, inp)  # [B, T, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=IGNORE_INDEX,
                               label_smoothing=self.args.label_smoothing)
        lr = learning_rate(self.progress["step"], self.total_steps, self.args)
        return {"loss": loss.item(), "lr": lr, "grad_norm": self._update(loss, lr)}

    def scst_step(self, x, keys: list) -> dict:
        """Self-critical step: reward(sample) - reward(greedy) weighs the samples' log-likelihood."""
        k, max_len = self.args.scst_samples, self.config["generation"]["max_len"]
        feats = self.features(x)
        self.model.eval()
        with torch.no_grad(), autocast(self.device):
            greedy = self.model.decoder.greedy(feats, max_len, EOT)
            samples = self.model.decoder.sample(feats.repeat_interleave(k, 0), max_len, EOT,
                                                generator=self.scst_generator)
        self.model.train()
        text = [tokenize(caption_text(self.tokenizer, c)) for c in greedy + samples]
        sample_keys = [key for key in keys for _ in range(k)]
        rewards = self.reward.score_candidates(keys + sample_keys, text)
        baseline = torch.tensor(rewards[:len(keys)]).repeat_interleave(k)
        advantage = (torch.tensor(rewards[len(keys):]) - baseline).float().to(self.device)  # [B * k]
        inp, tgt = make_batch(samples, ended=[len(c) < max_len for c in samples])
        inp, tgt = inp.to(self.device), tgt.to(self.device)
        with autocast(self.device):
            logits = self.model(feats.repeat_interleave(k, 0), inp)
        mask = tgt != IGNORE_INDEX
        logp = logits.float().log_softmax(-1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B*k, T]
        loss = -(advantage.unsqueeze(1) * logp * mask).sum() / mask.sum()
        return {"loss": loss.item(), "lr": self.args.scst_lr, "reward": float(rewards[len(keys):].mean()),
                "baseline": float(baseline.mean()), "grad_norm": self._update(loss, self.args.scst_lr)}

    # -- loops --------------------------------------------------------------------

    def _stop(self) -> bool:
        return bool(self.args.max_steps) and self.progress["step"] >= self.args.max_steps

    def _after_step(self, metrics: dict) -> None:
        step = self.progress["step"] = self.progress["step"] + 1
        self.progress["batch"] += 1
        if step % self.args.log_every == 0 or step == 1:
            self.log(**metrics)
        if self.args.val_every and step % self.args.val_every == 0:
            self.validate()
        elif step % self.args.save_every == 0:
            self._save_state()

    def _epochs(self, phase: str, epochs: int, n: int, batch_size: int):
        """Yields (epoch, index batches) for the phase, resuming mid-epoch; validates after each epoch."""
        while self.progress["phase"] == phase and self.progress["epoch"] < epochs:
            start = self.progress["batch"] * batch_size
            yield EpochSampler(n, self.args.seed, self.progress["epoch"], start)
            if self._stop():
                return
            self.progress.update(epoch=self.progress["epoch"] + 1, batch=0)
            self.validate()

    def run(self) -> None:
        args = self.args
        if self.progress["step"] == 0 and self.progress["best_step"] < 0:
            self.validate()  # the starting point: GPT-2 with fresh (identity) new modules
        bar = tqdm(desc="training", unit="step", file=sys.stderr, initial=self.progress["step"])
        if self.progress["phase"] == "xe":
            data = CaptionSamples(self.train_split.samples, self.train_images)
            for sampler in self._epochs("xe", args.epochs, len(data), args.batch_size):
                loader = self._loader(data, args.batch_size, sampler, collate_captions)
                for x, inp, tgt in loader:
                    metrics = self.xe_step(x, inp, tgt)
                    self._after_step(metrics)
                    bar.update()
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", epoch=self.progress["epoch"])
                    if self._stop():
                        break
            if not self._stop():
                self.progress.update(phase="scst", epoch=0, batch=0)
                self.optimizer = make_optimizer(self.params, args.scst_lr, 0.0)
        if self.progress["phase"] == "scst" and args.scst_epochs and not self._stop():
            split = self.train_split
            self.reward = CiderD({k: [tokenize(r) for r in split.refs[k]] for k in split.keys})
            for sampler in self._epochs("scst", args.scst_epochs, len(split.keys), args.scst_batch_size):
                loader = self._loader(self.train_images, args.scst_batch_size, sampler)
                order = list(sampler)
                for i, x in enumerate(loader):
                    keys = [split.keys[j] for j in order[i * args.scst_batch_size:(i + 1) * args.scst_batch_size]]
                    metrics = self.scst_step(x, keys)
                    self._after_step(metrics)
                    bar.update()
                    bar.set_postfix(reward=f"{metrics['reward']:.3f}", epoch=self.progress["epoch"])
                    if self._stop():
                        break
        bar.close()
        if self._stop():
            print(f"stopped at --max-steps {args.max_steps}", file=sys.stderr)
            self.validate()
        if not os.path.isfile(args.out):  # no validation improved on nothing: keep the last model
            save_checkpoint(self.model, args.out)
        best = self.progress
        print(f"best validation CIDEr {best['best_cider']:.4f} at step {best['best_step']}; checkpoint {args.out}",
              file=sys.stderr)


def main(argv=None) -> None:
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
