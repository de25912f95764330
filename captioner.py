"""The captioner: frozen ViT encoder + GPT-2 decoder with PEFT, and its checkpoint.

A checkpoint describes itself: `{"config": plain dict, "state_dict":
trainable tensors only}`. `load_checkpoint` rebuilds the model from the
config, takes the frozen parts from their sources (the encoder's weights,
the course's `decoder_model.bin`) and then the trained tensors, and fails
unless the saved keys and the trainable parameters match one to one, in
shape, with finite values. Its decoding settings (`generation`) are checked
when it is read (`check_generation`), not at the first batch.

What the graders receive as a caption (never empty, within CLIP's context)
is `p2_inference.py`'s policy, not the model's.
"""
from __future__ import annotations

import contextlib
import copy
import math
import sys

import torch
import torch.nn as nn

from decoder import (
    GPT2_SMALL,
    Decoder,
    DecoderConfig,
    infer_gpt2_shape,
    load_gpt2_into,
    load_gpt2_state,
    parameter_group,
)
from encoder import DEFAULT_ENCODER, ImageEncoder
from file_io import atomic_torch_save
from tokenizer import EOT_ID
from weights import assign_state, check_finite, check_weight_tensors, skip_init, torch_load

MAX_TRAINABLE = 35_000_000  # the course's limit, counted from the saved checkpoint
CHECKPOINT_FORMAT = 1

# Each --peft choice as decoder settings; cross-attention in every block for all.
# Sized to use the 35M budget: cross-attention + visual_proj is 29.15M at full size.
PEFT_PRESETS = {
    "none": {},
    "adapter": dict(adapter_dim=128),  # +4.74M
    "prefix": dict(prefix_len=64, prefix_hidden=256),  # +1.18M saved (+4.9M MLP while training)
    "lora": dict(lora_rank=32, lora_alpha=32.0),  # +4.72M
}
GENERATION = dict(beam_size=5, max_len=30, length_penalty=0.0)
# Upper bounds of the decoding settings: beyond them captions stop improving while
# memory (logits [images * beams, 50257]) and time keep growing; the bounds turn a
# typo (HW3_P2_BEAM=100000 would ask for ~240 GB) into a clear error.
MAX_BEAM = 20
MAX_LENGTH_PENALTY = 5.0


def autocast(device):
    """fp16 autocast on CUDA (the 2080 Ti has no bf16); plain fp32 elsewhere."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def caption_text(tokenizer, ids: list) -> str:
    """Token ids -> caption: decoded, whitespace collapsed and stripped."""
    return " ".join(tokenizer.decode(ids).split())


def check_generation(settings, context: int, source: str = "generation settings") -> dict:
    """Decoding settings checked against their ranges; returns them as plain int / float.

    `settings` must hold exactly beam_size (1..MAX_BEAM), max_len (1..context - 2:
    a caption and its start and end tokens must fit GPT-2's context of `context`
    positions) and length_penalty (0..MAX_LENGTH_PENALTY). Raises ValueError
    naming `source`, the bad value and the allowed range.
    """
    if not isinstance(settings, dict):
        raise ValueError(f"{source}: expected a dict with {sorted(GENERATION)}, got {type(settings).__name__}")
    missing, unknown = sorted(set(GENERATION) - set(settings)), sorted(set(settings) - set(GENERATION))
    if missing or unknown:
        raise ValueError(f"{source}: expected exactly {sorted(GENERATION)}; missing {missing}, unknown {unknown}")
    ranges = {"beam_size": (int, 1, MAX_BEAM), "max_len": (int, 1, context - 2),
              "length_penalty": (float, 0.0, MAX_LENGTH_PENALTY)}
    checked = {}
    for name, (kind, low, high) in ranges.items():
        value = settings[name]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int:
            number = number and float(value).is_integer()
        if not (number and math.isfinite(value) and low <= value <= high):
            what = "an integer" if kind is int else "a number"
            raise ValueError(f"{source}: {name}={value!r} is out of range; expected {what} in {low}..{high}")
        checked[name] = kind(value)
    return checked


def make_config(peft: str = "none", encoder: str = DEFAULT_ENCODER, encoder_kwargs: dict | None = None,
                generation: dict | None = None, **decoder_overrides) -> dict:
    """The plain-dict config a checkpoint carries. Shapes are filled in by `Captioner`."""
    if peft not in PEFT_PRESETS:
        raise ValueError(f"unknown PEFT method {peft!r}; choose from {sorted(PEFT_PRESETS)}")
    decoder = dict(PEFT_PRESETS[peft])
    decoder.update({k: v for k, v in decoder_overrides.items() if v is not None})
    return dict(format=CHECKPOINT_FORMAT, peft=peft,
                encoder=dict(name=encoder, model_kwargs=dict(encoder_kwargs or {})),
                decoder=decoder, generation={**GENERATION, **(generation or {})})


class Captioner(nn.Module):
    """Image -> caption token ids. `decoder_weights=None` leaves GPT-2 random (tests, benchmarks).

    The frozen weights are put in place on `device` (default: the CPU) as they are read.
    """

    def __init__(self, config: dict, decoder_weights: str | None = None, encoder_weights: str | None = None,
                 pretrained_encoder: bool = True, device=None):
        super().__init__()
        config = copy.deepcopy(config)
        self.encoder = ImageEncoder(config["encoder"]["name"], weights=encoder_weights, pretrained=pretrained_encoder,
                                    model_kwargs=config["encoder"].get("model_kwargs"), device=device,
                                    recorded=config["encoder"].get("weights_file"))
        gpt2 = load_gpt2_state(decoder_weights, check_values=False) if decoder_weights else None  # load_gpt2_into checks
        shape = infer_gpt2_shape(gpt2) if gpt2 is not None else {}
        decoder = config["decoder"]
        for key, value in shape.items():
            if decoder.get(key, value) != value:
                raise ValueError(f"checkpoint was trained with GPT-2 {key}={decoder[key]}, "
                                 f"but {decoder_weights} has {key}={value}")
        decoder.update({**GPT2_SMALL, **decoder, **shape, "encoder_width": self.encoder.width})
        config["decoder"] = DecoderConfig(**decoder).to_dict()
        config["generation"] = check_generation(config.get("generation"), config["decoder"]["n_ctx"])
        self.config = config
        self.decoder = Decoder(DecoderConfig(**config["decoder"]))
        if gpt2 is not None:
            load_gpt2_into(self.decoder, gpt2, str(decoder_weights), device)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> image tokens [B, S, encoder width]"""
        return self.encoder(images)

    def forward(self, feats: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, T, V] for input tokens idx [B, T] given image tokens feats [B, S, W]."""
        return self.decoder(idx, self.decoder.memory(feats.to(self.decoder.visual_proj.weight.dtype)))[0]

    def generation(self, **overrides) -> dict:
        """The config's decoding settings with `overrides` (None keeps the config's), checked."""
        settings = {**self.config["generation"], **{k: v for k, v in overrides.items() if v is not None}}
        return check_generation(settings, self.decoder.cfg.n_ctx)

    @torch.no_grad()
    def generate(self, feats: torch.Tensor, beam_size: int | None = None, max_len: int | None = None,
                 length_penalty: float | None = None, cuda_graph: bool = False) -> list:
        """Caption token ids (without <|endoftext|>) per image; defaults from the config.
        `cuda_graph`: replay each search step as a CUDA graph (`Decoder.beam_search`)."""
        gen = self.generation(beam_size=beam_size, max_len=max_len, length_penalty=length_penalty)
        return self.decoder.beam_search(feats, gen["beam_size"], gen["max_len"], EOT_ID, gen["length_penalty"],
                                        cuda_graph=cuda_graph)

    def decoding_bytes(self, generation: dict, element_bytes: int) -> int:
        """Memory one image takes while its captions are decoded with `generation`, activations
        stored in `element_bytes` (2 under fp16 autocast): its image tokens and their per-block
        cross-attention keys and values, the K beams' key/value cache for max_len positions
        (and one block's keys and values selected for attention, `KVCache.write`) with its row
        indices, and a step's logits [K, V] in fp16 and three fp32 forms (float, log-softmax, scores)."""
        cfg = self.decoder.cfg
        S = self.encoder.grid[0] * self.encoder.grid[1] + self.encoder.prefix_tokens
        K, T = generation["beam_size"], generation["max_len"]
        cross = sum(cfg.has_cross(i) for i in range(cfg.n_layer))
        image = S * (self.encoder.width + cfg.n_embd * (2 * cross + 1)) * element_bytes
        cache = K * T * (cfg.n_embd * 2 * (cfg.n_layer + 1) * element_bytes + 8)
        logits = K * cfg.vocab_size * (element_bytes + 3 * 4)
        return image + cache + logits

    @torch.no_grad()
    def cross_attention(self, feats: torch.Tensor, tokens: list) -> torch.Tensor:
        """Last cross-attention block's weights over the image patches while reading
        [<|endoftext|>, t1 .. tN, <|endoftext|>]: [N + 2, rows, cols], heads averaged.

        The model is causal, so position i's attention in this one teacher-forced
        pass is exactly its attention while generating token i + 1.
        """
        idx = torch.tensor([[EOT_ID, *tokens, EOT_ID]], device=feats.device)
        _, att = self.decoder(idx, self.decoder.memory(feats[:1]))  # [1, H, T, S]
        att = att[0].mean(0)[:, self.encoder.prefix_tokens:]  # [T, patches]
        rows, cols = self.encoder.grid
        return att.reshape(att.size(0), rows, cols)


def mark_trainable(model: Captioner, verbose: bool = True) -> dict:
    """Freeze everything but the new modules (decided by `parameter_group`); counts per group.

    Asserts that every group the config asks for has parameters and that no
    other group does.
    """
    counts = {}
    for name, param in model.named_parameters():
        group = parameter_group(name)
        param.requires_grad_(group is not None)
        if group is not None:
            counts[group] = counts.get(group, 0) + param.numel()
    cfg = model.decoder.cfg
    expected = {"cross_attention", "visual_proj"}
    expected |= {"adapter"} if cfg.adapter_dim else set()
    expected |= {"prefix"} if cfg.prefix_len else set()
    expected |= {"lora"} if cfg.lora_rank else set()
    if set(counts) != expected:
        raise AssertionError(f"trainable groups {sorted(counts)} differ from the config's {sorted(expected)}")
    if verbose:
        for group in sorted(counts):
            print(f"  {group:16s} {counts[group]:>12,d}", file=sys.stderr)
    return counts


def trainable_state(model: Captioner) -> dict:
    """The tensors a checkpoint holds: trainable parameters only, prefixes folded."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if not names:
        raise RuntimeError("no trainable parameters: call mark_trainable(model) first")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}
    cfg = model.decoder.cfg
    if cfg.prefix_len and cfg.prefix_hidden:  # reparameterised while training: save its output
        state = {k: v for k, v in state.items() if not k.startswith("decoder.prefix.")}
        with torch.no_grad():
            state["decoder.prefix.kv"] = model.decoder.prefix().detach().float().cpu().clone()
    return state


def export_config(model: Captioner) -> dict:
    config = copy.deepcopy(model.config)
    config["decoder"]["prefix_hidden"] = 0  # trainable_state folds the prefix MLP away
    source = model.encoder.weights_record()
    if source is not None:  # trained from a named file: inference finds it again (encoder.find_weights)
        config["encoder"]["weights_file"] = source
    return config


def count_parameters(state: dict) -> int:
    return sum(t.numel() for t in state.values())


def save_checkpoint(model: Captioner, path: str) -> int:
    """Write `{config, state_dict}` atomically; refuses more than the course's 35M parameters."""
    state = trainable_state(model)
    total = count_parameters(state)
    if total >= MAX_TRAINABLE:
        raise ValueError(f"checkpoint would hold {total:,d} trainable parameters; the limit is < {MAX_TRAINABLE:,d}")
    atomic_torch_save({"config": export_config(model), "state_dict": state}, path)
    return total


def _what_it_holds(obj) -> str:
    """What a file that is not a captioner checkpoint holds instead, for error messages."""
    if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        if "wte.weight" in obj:
            return f"{len(obj)} GPT-2 tensors: it looks like the course's decoder_model.bin, the decoder weights"
        return f"a bare state_dict of {len(obj)} tensors, as the course's template saves"
    if isinstance(obj, dict):
        return f"a dict with keys {sorted(map(str, obj))[:8]}"
    return f"a {type(obj).__name__}"


# The decoder setting that sizes each method: a method is present when its size is not 0.
PEFT_SIZES = {"adapter": "adapter_dim", "prefix": "prefix_len", "lora": "lora_rank"}


def check_peft_label(config: dict, path: str) -> None:
    """ValueError unless config['peft'] names the one method the decoder settings build (or 'none' for
    none): the model is built from the settings, the reports name it by the label, so a label that
    disagrees would describe another model than the one that captions."""
    label = config.get("peft")
    if label not in PEFT_PRESETS:
        raise ValueError(f"{path}: config['peft'] is {label!r}; expected one of {sorted(PEFT_PRESETS)} "
                         "(as p2_train.py saves)")
    built = sorted(m for m, size in PEFT_SIZES.items() if config["decoder"].get(size))
    if built != ([] if label == "none" else [label]):
        sizes = ", ".join(f"{PEFT_SIZES[m]}={config['decoder'][PEFT_SIZES[m]]}" for m in built) or "no method"
        raise ValueError(f"{path}: config['peft'] is {label!r} but its decoder settings build {sizes}: the label "
                         "and the model disagree (a checkpoint edited by hand?)")


def read_checkpoint(path: str) -> dict:
    """A checkpoint file, checked: {config, state_dict} of finite tensors, its format and decoding settings."""
    checkpoint = torch_load(path)
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("config"), dict)
            and isinstance(checkpoint.get("state_dict"), dict)):
        raise ValueError(f"{path}: not a captioner checkpoint; expected a dict with 'config' and 'state_dict' "
                         f"(as p2_train.py saves), found {_what_it_holds(checkpoint)}")
    config, state = checkpoint["config"], checkpoint["state_dict"]
    if config.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {config.get('format')!r}, this code reads {CHECKPOINT_FORMAT}")
    not_tensors = sorted(repr(k) for k, v in state.items() if not torch.is_tensor(v))
    if not_tensors:
        raise ValueError(f"{path}: state_dict values that are not tensors: {not_tensors[:8]}")
    check_weight_tensors(state, path)
    check_finite(state, path)
    for part in ("encoder", "decoder"):
        if not isinstance(config.get(part), dict):
            raise ValueError(f"{path}: config[{part!r}] is {_what_it_holds(config.get(part))}; expected a dict "
                             "(as p2_train.py saves)")
    check_peft_label(config, path)
    if not isinstance(config["encoder"].get("name"), str):
        raise ValueError(f"{path}: config['encoder']['name'] is {_what_it_holds(config['encoder'].get('name'))}; "
                         "expected the timm model name")
    n_ctx = config["decoder"].get("n_ctx")
    config["generation"] = check_generation(config.get("generation"), n_ctx if isinstance(n_ctx, int) else
                                            GPT2_SMALL["n_ctx"], f"{path}: generation settings")
    return checkpoint


def load_checkpoint(path: str, decoder_weights: str | None, encoder_weights: str | None = None,
                    pretrained_encoder: bool = True, device="cpu") -> Captioner:
    """Rebuild the captioner from a checkpoint on `device`; the saved tensors must be exactly the
    trainable parameters, name for name and shape for shape.

    With GPT-2's weights every decoder tensor comes from a file (GPT-2's, or the checkpoint's
    for every new one: checked below), so the decoder is built without initialisation.
    """
    checkpoint = read_checkpoint(path)
    with skip_init(decoder_weights is not None):
        model = Captioner(checkpoint["config"], decoder_weights, encoder_weights, pretrained_encoder, device)
    mark_trainable(model, verbose=False)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state = checkpoint["state_dict"]
    if set(state) != set(trainable):
        raise ValueError(f"{path}: saved tensors do not match the model's trainable parameters: "
                         f"not in the model {sorted(set(state) - set(trainable))[:8]}, "
                         f"not saved {sorted(set(trainable) - set(state))[:8]}")
    wrong = [f"{k} {tuple(v.shape)}, expected {tuple(trainable[k].shape)}"
             for k, v in sorted(state.items()) if v.shape != trainable[k].shape]
    if wrong:
        raise ValueError(f"{path}: saved tensors of another shape than its config builds: {wrong[:5]}")
    # names and shapes match one to one: nothing is left to a strict=False load
    assign_state(model, state, path, device)
    model.requires_grad_(False)
    return model.to(device).eval()
