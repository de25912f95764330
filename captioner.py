"""The captioner: frozen ViT encoder + GPT-2 decoder with PEFT, and its checkpoint.

A checkpoint describes itself: `{"config": plain dict, "state_dict":
trainable tensors only}`. `load_checkpoint` rebuilds the model from the
config, takes the frozen parts from their sources (the encoder's weights,
the course's `decoder_model.bin`) and then the trained tensors, and fails
unless the saved keys and the trainable parameters match one to one.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import sys

import torch
import torch.nn as nn

from decoder import Decoder, DecoderConfig, infer_gpt2_shape, load_gpt2_into, load_gpt2_state, parameter_group
from encoder import DEFAULT_ENCODER, ImageEncoder
from io_utils import atomic_torch_save, torch_load, warn

MAX_TRAINABLE = 35_000_000  # the course's limit, counted from the saved checkpoint
CHECKPOINT_FORMAT = 1
GPT2_SMALL = dict(n_layer=12, n_embd=768, vocab_size=50257, n_ctx=1024)
EOT = 50256  # <|endoftext|>: GPT-2's start and end token

# Each --peft choice as decoder settings; cross-attention in every block for all.
# Sized to use the 35M budget: cross-attention + visual_proj is 29.15M at full size.
PEFT_PRESETS = {
    "none": {},
    "adapter": dict(adapter_dim=128),  # +4.74M
    "prefix": dict(prefix_len=64, prefix_hidden=256),  # +1.18M saved (+4.9M MLP while training)
    "lora": dict(lora_rank=32, lora_alpha=32.0),  # +4.72M
}
GENERATION = dict(beam_size=5, max_len=30, length_penalty=0.0)
CLIP_TOKENS = 75  # CLIP's 77-token context less its start and end tokens
FALLBACK_CAPTION = "a photo."


def autocast(device):
    """fp16 autocast on CUDA (the 2080 Ti has no bf16); plain fp32 elsewhere."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def caption_text(tokenizer, ids: list) -> str:
    """Token ids -> caption: decoded, whitespace collapsed and stripped."""
    return " ".join(tokenizer.decode(ids).split())


@functools.lru_cache(maxsize=None)
def _clip_tokenizer():
    from clip.simple_tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def fit_clip_context(caption: str) -> str:
    """`caption` less the words at its end that do not fit CLIP's context.

    max_len GPT-2 tokens are normally far fewer CLIP tokens, but one GPT-2
    token can hold many bytes that CLIP spends a token each on, and the
    course's CLIPScore script crashes beyond 77 tokens.
    """
    while len(_clip_tokenizer().encode(caption)) > CLIP_TOKENS:
        caption = caption.rsplit(" ", 1)[0] if " " in caption else caption[:-1]
    return caption


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
    """Image -> caption token ids. `decoder_weights=None` leaves GPT-2 random (tests, benchmarks)."""

    def __init__(self, config: dict, decoder_weights: str | None = None, encoder_weights: str | None = None,
                 pretrained_encoder: bool = True):
        super().__init__()
        config = copy.deepcopy(config)
        self.encoder = ImageEncoder(config["encoder"]["name"], weights=encoder_weights,
                                    pretrained=pretrained_encoder, model_kwargs=config["encoder"].get("model_kwargs"))
        gpt2 = load_gpt2_state(decoder_weights) if decoder_weights else None
        shape = infer_gpt2_shape(gpt2) if gpt2 is not None else {}
        decoder = config["decoder"]
        for key, value in shape.items():
            if decoder.get(key, value) != value:
                raise ValueError(f"checkpoint was trained with GPT-2 {key}={decoder[key]}, "
                                 f"but {decoder_weights} has {key}={value}")
        decoder.update({**GPT2_SMALL, **decoder, **shape, "encoder_width": self.encoder.width})
        config["decoder"] = DecoderConfig(**decoder).to_dict()
        self.config = config
        self.decoder = Decoder(DecoderConfig(**config["decoder"]))
        if gpt2 is not None:
            load_gpt2_into(self.decoder, gpt2)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> image tokens [B, S, encoder width]"""
        return self.encoder(images)

    def forward(self, feats: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, T, V] for input tokens idx [B, T] given image tokens feats [B, S, W]."""
        return self.decoder(idx, self.decoder.memory(feats.to(self.decoder.visual_proj.weight.dtype)))[0]

    @torch.no_grad()
    def generate(self, feats: torch.Tensor, beam_size: int | None = None, max_len: int | None = None,
                 length_penalty: float | None = None) -> list:
        """Caption token ids (without <|endoftext|>) per image; defaults from the config."""
        gen = self.config["generation"]
        beam_size = gen["beam_size"] if beam_size is None else beam_size
        max_len = gen["max_len"] if max_len is None else max_len
        length_penalty = gen["length_penalty"] if length_penalty is None else length_penalty
        if beam_size < 1 or max_len < 1:
            raise ValueError(f"beam_size and max_len must be >= 1, got {beam_size} and {max_len}")
        if beam_size == 1:
            return self.decoder.greedy(feats, max_len, EOT)
        return self.decoder.beam_search(feats, beam_size, max_len, EOT, length_penalty)

    @torch.no_grad()
    def captions(self, feats: torch.Tensor, tokenizer, names: list | None = None, **generation) -> list:
        """Clean caption text per image: decoded, whitespace collapsed, never empty, within CLIP's context.

        The model cannot end a caption before its first token, but whitespace
        tokens can decode to nothing: such an image is decoded again greedily,
        and gets FALLBACK_CAPTION only if that is empty too. `names` label the warnings.
        """
        names = names or [f"image {i}" for i in range(len(feats))]
        texts = [caption_text(tokenizer, ids) for ids in self.generate(feats, **generation)]
        empty = [i for i, text in enumerate(texts) if not text]
        if empty:
            greedy = self.generate(feats[empty], beam_size=1, max_len=generation.get("max_len"))
            for i, ids in zip(empty, greedy):
                texts[i] = caption_text(tokenizer, ids) or FALLBACK_CAPTION
                warn(f"the caption of {names[i]!r} was empty; it is now {texts[i]!r}")
        fitted = [fit_clip_context(text) for text in texts]
        for name, text, fit in zip(names, texts, fitted):
            if fit != text:
                warn(f"the caption of {name!r} was cut to fit CLIP's 77-token context: {fit!r}")
        return fitted

    @torch.no_grad()
    def cross_attention(self, feats: torch.Tensor, tokens: list) -> torch.Tensor:
        """Last cross-attention block's weights over the image patches while reading
        [<|endoftext|>, t1 .. tN, <|endoftext|>]: [N + 2, rows, cols], heads averaged.

        The model is causal, so position i's attention in this one teacher-forced
        pass is exactly its attention while generating token i + 1.
        """
        idx = torch.tensor([[EOT, *tokens, EOT]], device=feats.device)
        _, _, att = self.decoder(idx, self.decoder.memory(feats[:1]))  # [1, H, T, S]
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
    prefix = model.decoder.prefix
    if prefix is not None and prefix.kv is None:  # reparameterised while training: save its output
        state = {k: v for k, v in state.items() if not k.startswith("decoder.prefix.")}
        with torch.no_grad():
            state["decoder.prefix.kv"] = prefix().detach().float().cpu().clone()
    return state


def export_config(model: Captioner) -> dict:
    config = copy.deepcopy(model.config)
    config["decoder"]["prefix_hidden"] = 0  # trainable_state folds the prefix MLP away
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


def read_checkpoint(path: str) -> dict:
    checkpoint = torch_load(path)
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("config"), dict)
            and isinstance(checkpoint.get("state_dict"), dict)):
        raise ValueError(f"{path}: not a captioner checkpoint (expected a dict with 'config' and 'state_dict')")
    if checkpoint["config"].get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {checkpoint['config'].get('format')!r}, "
                         f"this code reads {CHECKPOINT_FORMAT}")
    return checkpoint


def load_checkpoint(path: str, decoder_weights: str | None, encoder_weights: str | None = None,
                    pretrained_encoder: bool = True) -> Captioner:
    """Rebuild the captioner from a checkpoint; the saved keys must equal the trainable parameters."""
    checkpoint = read_checkpoint(path)
    model = Captioner(checkpoint["config"], decoder_weights, encoder_weights, pretrained_encoder)
    mark_trainable(model, verbose=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    saved = set(checkpoint["state_dict"])
    if saved != trainable:
        raise ValueError(f"{path}: saved tensors do not match the model's trainable parameters: "
                         f"not in the model {sorted(saved - trainable)[:8]}, "
                         f"not saved {sorted(trainable - saved)[:8]}")
    missing, unexpected = model.load_state_dict(checkpoint["state_dict"], strict=False)
    assert not unexpected and not (set(missing) & saved), (missing, unexpected)
    model.requires_grad_(False)
    return model.eval()
