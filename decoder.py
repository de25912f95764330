"""The course's GPT-2 decoder, extended to caption images.

GPT-2 small as the course ships it (`decoder_model.bin`, HuggingFace's `gpt2`
without the `transformer.` prefix), plus what captioning needs, each switched
by a config value and each initialised so that a fresh model computes exactly
what GPT-2 computes (the golden test checks this against `transformers`):

- cross-attention after self-attention in the chosen blocks, pre-LN, caption
  tokens attending to the image tokens; the image tokens are projected once
  from the encoder's width to the decoder's (`visual_proj`); the output
  projection starts at zero;
- adapters (Houlsby et al. 2019): a bottleneck MLP with a residual after the
  self-attention and/or the MLP of chosen blocks, its up-projection at zero;
- prefix tuning (Li & Liang 2021): P learned key/value pairs per layer that
  every self-attention query also attends to, through their own softmax
  whose output is added (a shared softmax would take attention away from
  GPT-2's tokens before any training). The prefix values start at zero, so
  the prefix adds nothing at first while both keys and values get gradients
  from the first step (a zero-initialised gate, as in LLaMA-Adapter, would
  leave the prefix without gradient until the gate opens). An optional
  reparameterisation MLP is used while training and folded into plain
  tensors for the checkpoint (`captioner.trainable_state`);
- LoRA (Hu et al. 2021): W x + (alpha / r) B A x on chosen GPT-2 linears,
  B at zero. Written here rather than with loralib: loralib merges B A into
  W on `eval()`, so weights loaded after that are silently ignored, and its
  default alpha of 1 scales the update by 1 / r.

A part a config leaves out is a module that passes the stream through
(`nn.Identity` for an adapter, `NoCrossAttention`, `NoPrefix`), so the blocks'
`forward` has no branch on the config; None is kept for optional inputs (the
key/value cache, a layer's prefix). What trains is decided by
`parameter_group` alone, by parameter name.

Decoding keeps each block's keys and values in a `KVCache` preallocated for
the whole caption and written in place, and a beam search step is a fixed
sequence of tensor operations with no host synchronisation (`BeamSearch`), so
that on CUDA the step can be captured once as a CUDA graph and replayed
(`Decoder.beam_search(..., cuda_graph=True)`), which removes the Python and
kernel-launch overhead that otherwise dominates decoding.

Shapes: B images, K beams per image, N = B * K sequences, T caption tokens,
S image tokens, P prefix tokens, C width, H heads, D = C / H head width,
V vocabulary, L layers (LC cached positions).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from weights import assign_state, check_finite, check_weight_tensors, torch_load

# GPT-2 stores these four as Conv1D, weight (in, out); nn.Linear wants (out, in).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Non-parameter buffers HuggingFace checkpoints may carry (the causal masks).
IGNORED_BUFFERS = (".attn.bias", ".attn.masked_bias")
LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
ADAPTER_PLACES = ("attn", "mlp")
HEAD_WIDTH = 64  # every GPT-2 size uses 64-wide heads


# The course's decoder_model.bin. Used only for models built without a weights
# file (parameter counts, benchmarks); otherwise `infer_gpt2_shape` reads the shape.
GPT2_SMALL = dict(n_layer=12, n_embd=768, vocab_size=50257, n_ctx=1024)


@dataclass
class DecoderConfig:
    # GPT-2's shape: given, never defaulted (from `infer_gpt2_shape`, or GPT2_SMALL without weights)
    n_layer: int
    n_embd: int
    vocab_size: int
    n_ctx: int
    # width of the image tokens: the encoder's
    encoder_width: int
    # blocks with cross-attention; None = every block
    cross_layers: list | None = None
    # adapter: bottleneck width (0 = none), where in the block, which blocks (None = all)
    adapter_dim: int = 0
    adapter_places: list = field(default_factory=lambda: list(ADAPTER_PLACES))
    adapter_layers: list | None = None
    # prefix tuning: prefix length (0 = none); hidden width of the training-time MLP (0 = none)
    prefix_len: int = 0
    prefix_hidden: int = 0
    # LoRA: rank (0 = none), alpha (update scaled by alpha / rank), target linears
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_targets: list = field(default_factory=lambda: list(LORA_TARGETS))
    lora_dropout: float = 0.0

    def __post_init__(self):
        if self.n_embd % HEAD_WIDTH:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of the head width {HEAD_WIDTH}")
        for name in ("cross_layers", "adapter_layers"):
            layers = getattr(self, name)
            if layers is not None:
                bad = [i for i in layers if not 0 <= int(i) < self.n_layer]
                if bad:
                    raise ValueError(f"{name} {bad} out of range 0..{self.n_layer - 1}")
                setattr(self, name, sorted(int(i) for i in layers))
        bad = [p for p in self.adapter_places if p not in ADAPTER_PLACES]
        if bad:
            raise ValueError(f"adapter_places {bad} not in {list(ADAPTER_PLACES)}")
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if bad:
            raise ValueError(f"lora_targets {bad} not in {list(LORA_TARGETS)}")
        if self.lora_rank and self.lora_alpha <= 0:
            raise ValueError("lora_alpha must be > 0 when lora_rank > 0 (the update is scaled by alpha / rank)")
        self.adapter_places = list(self.adapter_places)
        self.lora_targets = list(self.lora_targets)

    @property
    def n_head(self) -> int:
        return self.n_embd // HEAD_WIDTH

    def has_cross(self, layer: int) -> bool:
        return self.cross_layers is None or layer in self.cross_layers

    def has_adapter(self, layer: int, place: str) -> bool:
        in_layer = self.adapter_layers is None or layer in self.adapter_layers
        return self.adapter_dim > 0 and in_layer and place in self.adapter_places

    def to_dict(self) -> dict:
        return asdict(self)


def parameter_group(name: str) -> str | None:
    """The trainable group a parameter belongs to, by its name; None = frozen.

    The single place that decides what trains: everything GPT-2 and the
    encoder brought stays frozen, every module added for captioning trains.
    """
    parts = name.split(".")
    if "lora_A" in parts or "lora_B" in parts:
        return "lora"
    if "prefix" in parts:
        return "prefix"
    if "adapter_attn" in parts or "adapter_mlp" in parts:
        return "adapter"
    if "cross" in parts:
        return "cross_attention"
    if "visual_proj" in parts:
        return "visual_proj"
    return None


class Linear(nn.Linear):
    """nn.Linear with an optional LoRA update: y = W x + b + (alpha / r) B A x."""

    def __init__(self, fan_in: int, fan_out: int, rank: int = 0, alpha: float = 1.0, dropout: float = 0.0):
        super().__init__(fan_in, fan_out)
        self.rank = rank
        if rank > 0:
            self.lora_A = nn.Parameter(torch.empty(rank, fan_in))
            self.lora_B = nn.Parameter(torch.zeros(fan_out, rank))  # zero: starts as W exactly
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.scaling = alpha / rank
            self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.rank:
            y = y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling
        return y


def gpt2_linear(cfg: DecoderConfig, target: str, fan_in: int, fan_out: int) -> Linear:
    """One of GPT-2's linears (`target` names it as in LORA_TARGETS), with LoRA where the config asks."""
    rank = cfg.lora_rank if target in cfg.lora_targets else 0
    return Linear(fan_in, fan_out, rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)


class Adapter(nn.Module):
    """Bottleneck adapter with its residual: h + up(gelu(down(h)))."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)  # starts as the identity
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.gelu(self.down(h)))


def _heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """[N, T, C] -> [N, H, T, D]"""
    N, T, C = x.shape
    return x.view(N, T, n_head, C // n_head).transpose(1, 2)


def _merge_heads(y: torch.Tensor) -> torch.Tensor:
    """[N, H, T, D] -> [N, T, C]"""
    N, H, T, D = y.shape
    return y.transpose(1, 2).reshape(N, T, H * D)


def sample_next(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, generator=None) -> torch.Tensor:
    """One token id per row of logits [N, V], drawn among the top_k likeliest (0: all) and among
    the fewest likeliest holding probability top_p (the likeliest always stays).

    The draw is over the kept candidates only: multinomial over all 50257 tokens costs ~10x more.
    """
    if 0 < top_k < logits.size(-1):
        logits, ids = logits.topk(top_k, dim=-1)  # [N, k], likeliest first
    else:
        logits, ids = logits.sort(dim=-1, descending=True)  # [N, V]
    if top_p < 1.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))  # mass before >= p
    choice = torch.multinomial(logits.softmax(-1), 1, generator=generator)  # [N, 1]
    return ids.gather(-1, choice).squeeze(1)


class KVCache:
    """Self-attention keys and values of N sequences for `length` positions, one [2, H, N, LC, D]
    tensor per block (keys, values; heads outermost), zeros until written, and `rows` [N, LC]: the
    cache row that holds sequence n's key and value at position p.

    Decoding writes each new position in place, in the row of the sequence that made it. When
    beams change parents only `rows` is reordered (N x LC indices); each block then selects every
    sequence's keys and values from the rows its ancestors wrote, as whole D-wide rows, instead
    of moving every key of every block in place at every step (twice the bytes). Nothing moves
    in memory: what a captured CUDA graph needs. A block's tensor is allocated at its first
    write, in the dtype of what is written (fp16 under autocast). Positions not yet written hold
    zeros or an old row's values; attention masks them (a zero weight times a finite value adds
    nothing).
    """

    def __init__(self, n_layer: int, length: int):
        self.length = length
        self.layers = [None] * n_layer
        self.rows = None

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> tuple:
        """k, v [N, H, T, D] at positions pos [T] -> every position's keys and values of each
        sequence, [H, N, LC, D] each (heads outermost: selected, a new tensor)"""
        N, H, T, D = k.shape
        LC = self.length
        if self.rows is None:
            self.rows = torch.arange(N, device=k.device).unsqueeze(1).repeat(1, LC)
        if self.layers[layer] is None:
            self.layers[layer] = k.new_zeros(2, H, N, LC, D)
        kv = self.layers[layer]
        kv[0].index_copy_(2, pos, k.transpose(0, 1))
        kv[1].index_copy_(2, pos, v.transpose(0, 1))
        # the new positions are the writers' own rows (the same for every block: writing it again costs N x T)
        self.rows.index_copy_(1, pos, torch.arange(N, device=k.device).unsqueeze(1).expand(N, T))
        flat = (self.rows * LC + torch.arange(LC, device=k.device)).view(-1)  # [N * LC] rows of [2, H, N * LC, D]
        keys, values = kv.view(2, H, N * LC, D).index_select(2, flat).view(2, H, N, LC, D)
        return keys, values

    def reorder(self, rows: torch.Tensor) -> None:
        """Sequence n continues old sequence rows[n] (beam search's parents): it takes that
        sequence's ancestry."""
        if self.rows is not None:
            self.rows.copy_(self.rows.index_select(0, rows))


class SelfAttention(nn.Module):
    """GPT-2's causal self-attention, with an optional key/value cache and prefix."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        C = cfg.n_embd
        self.n_head = cfg.n_head
        self.c_attn = gpt2_linear(cfg, "attn.c_attn", C, 3 * C)
        self.c_proj = gpt2_linear(cfg, "attn.c_proj", C, C)

    def forward(self, x, pos, cache=None, prefix=None):
        """x [N, T, C] at positions pos [T]; cache (KVCache, block index) or None; prefix [2, P, C]
        (keys, values) or None. Returns y [N, T, C].

        Without a cache the keys are x's own; with one, x's keys are written at pos and every
        cached position is a key. Either way query i sees the keys at positions <= pos[i].
        """
        N, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (_heads(z, self.n_head) for z in (q, k, v))  # [N, H, T, D]
        scale = 1.0 / math.sqrt(q.size(-1))
        if cache is None:
            att = (q @ k.transpose(-2, -1)) * scale  # [N, H, T, T]
            att = att.masked_fill(pos[None, :] > pos[:, None], float("-inf")).softmax(dim=-1)
            y = att.to(v.dtype) @ v  # [N, H, T, D]
        else:
            kv, layer = cache
            k, v = kv.write(layer, k, v, pos)  # [H, N, LC, D]: the cache's order, so no copy of it
            key_pos = torch.arange(kv.length, device=x.device)
            att = (q.transpose(0, 1) @ k.transpose(-2, -1)) * scale  # [H, N, T, LC]
            att = att.masked_fill(key_pos[None, :] > pos[:, None], float("-inf")).softmax(dim=-1)
            y = (att.to(v.dtype) @ v).transpose(0, 1)  # [N, H, T, D]
        if prefix is not None:
            pk, pv = (z.view(1, -1, self.n_head, C // self.n_head).transpose(1, 2) for z in prefix)  # [1, H, P, D]
            patt = ((q @ pk.transpose(-2, -1).to(q.dtype)) * scale).softmax(dim=-1)  # [N, H, T, P]
            y = y + patt.to(y.dtype) @ pv.to(y.dtype)
        return self.c_proj(_merge_heads(y))


class CrossAttention(nn.Module):
    """Caption tokens (queries) attend to image tokens (keys, values); pre-LN.

    The image keys/values are computed once per image (`memory`) and shared
    by all K beams of that image: the K beams' queries are folded into one
    query block instead of copying the image tokens K times.
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        C = cfg.n_embd
        self.n_head = cfg.n_head
        self.ln = nn.LayerNorm(C)
        self.q = nn.Linear(C, C)
        self.kv = nn.Linear(C, 2 * C)
        self.c_proj = nn.Linear(C, C)
        nn.init.zeros_(self.c_proj.weight)  # a fresh block adds nothing to GPT-2's stream
        nn.init.zeros_(self.c_proj.bias)

    def memory(self, img: torch.Tensor):
        """img [B, S, C] (already projected) -> (keys transposed [B, H, D, S], values [B, H, S, D]).

        Both are stored contiguous in the layout the two products read: a head view of the
        projection would be copied by every product, i.e. at every decoding step, in every block.
        """
        k, v = self.kv(img).split(img.size(-1), dim=2)
        return _heads(k, self.n_head).transpose(-2, -1).contiguous(), _heads(v, self.n_head).contiguous()

    def forward(self, x, memory):
        """x [N, T, C] with N = B * K, beams of one image adjacent; memory (keys transposed
        [B, H, D, S], values [B, H, S, D]) from `memory`. Returns x plus what it read from the
        image [N, T, C] (the residual included, as in `Adapter`) and the attention with the
        beams folded, [B, H, K * T, S] (`unfold_beams` gives [N, H, T, S])."""
        kt, v = memory
        N, T, C = x.shape
        B, H, D, S = kt.shape
        K = N // B
        q = self.q(self.ln(x)).view(B, K, T, H, D).permute(0, 3, 1, 2, 4).reshape(B, H, K * T, D)
        att = ((q @ kt) / math.sqrt(D)).softmax(dim=-1)  # [B, H, K * T, S]
        y = att.to(v.dtype) @ v  # [B, H, K * T, D]
        y = y.view(B, H, K, T, D).permute(0, 2, 3, 1, 4).reshape(N, T, C)
        return x + self.c_proj(y), att

    @staticmethod
    def unfold_beams(att: torch.Tensor, n: int) -> torch.Tensor:
        """`forward`'s attention [B, H, K * T, S] -> [N, H, T, S] for N = B * K = n sequences."""
        B, H, KT, S = att.shape
        K = n // B
        return att.view(B, H, K, KT // K, S).transpose(1, 2).reshape(n, H, KT // K, S)


class NoCrossAttention(nn.Module):
    """A block without cross-attention (`cross_layers`): no image memory, the stream unchanged."""

    def memory(self, img: torch.Tensor) -> None:
        return None

    def forward(self, x, memory):
        return x, None


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        C = cfg.n_embd
        self.c_fc = gpt2_linear(cfg, "mlp.c_fc", C, 4 * C)
        self.c_proj = gpt2_linear(cfg, "mlp.c_proj", 4 * C, C)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    """GPT-2 block: x + attn(ln_1(x)), [x + cross(x, image)], x + mlp(ln_2(x)); adapters on the sublayer outputs."""

    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        C = cfg.n_embd
        self.ln_1 = nn.LayerNorm(C)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(C)
        self.mlp = MLP(cfg)
        self.cross = CrossAttention(cfg) if cfg.has_cross(layer) else NoCrossAttention()
        self.adapter_attn = Adapter(C, cfg.adapter_dim) if cfg.has_adapter(layer, "attn") else nn.Identity()
        self.adapter_mlp = Adapter(C, cfg.adapter_dim) if cfg.has_adapter(layer, "mlp") else nn.Identity()

    def forward(self, x, pos, memory=None, cache=None, prefix=None):
        x = x + self.adapter_attn(self.attn(self.ln_1(x), pos, cache, prefix))
        x, att = self.cross(x, memory)
        x = x + self.adapter_mlp(self.mlp(self.ln_2(x)))
        return x, att


class Prefix(nn.Module):
    """Learned key/value prefixes for every layer: `forward()` -> [L, 2, P, C] (keys, values).

    Keys start random, values at zero: a fresh prefix adds nothing. With
    `hidden > 0` they are produced by an MLP from P embeddings while training
    (Li & Liang's reparameterisation, which they found steadier), its output
    rows for the values at zero; the checkpoint holds only the MLP's output
    (`captioner.trainable_state`).
    """

    def __init__(self, n_layer: int, width: int, length: int, hidden: int = 0):
        super().__init__()
        self.shape = (n_layer, 2, length, width)
        if hidden:
            self.embedding = nn.Parameter(torch.randn(length, width) * 0.02)
            self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, n_layer * 2 * width))
            with torch.no_grad():
                out = self.mlp[2]
                out.weight.view(n_layer, 2, width, hidden)[:, 1] = 0.0  # value rows
                out.bias.view(n_layer, 2, width)[:, 1] = 0.0
            self.kv = None
        else:
            kv = torch.randn(*self.shape) * 0.02
            kv[:, 1] = 0.0  # values
            self.kv = nn.Parameter(kv)

    def forward(self) -> torch.Tensor:
        if self.kv is not None:
            return self.kv
        L, two, P, C = self.shape
        return self.mlp(self.embedding).view(P, L, two, C).permute(1, 2, 0, 3)  # [L, 2, P, C]


class NoPrefix(nn.Module):
    """No prefix tuning (`prefix_len` 0): no prefix for any of the L layers."""

    def __init__(self, n_layer: int):
        super().__init__()
        self.n_layer = n_layer

    def forward(self) -> list:
        return [None] * self.n_layer


class Decoder(nn.Module):
    """GPT-2 with cross-attention to image tokens and the PEFT modules above."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.n_embd
        self.wte = nn.Embedding(cfg.vocab_size, C)
        self.wpe = nn.Embedding(cfg.n_ctx, C)
        self.h = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(C)
        self.visual_proj = nn.Linear(cfg.encoder_width, C)
        self.prefix = Prefix(cfg.n_layer, C, cfg.prefix_len, cfg.prefix_hidden) if cfg.prefix_len else NoPrefix(cfg.n_layer)

    def memory(self, feats: torch.Tensor) -> list:
        """Encoder tokens [B, S, encoder_width] -> per block the cross-attention (k, v) or None."""
        img = self.visual_proj(feats)  # [B, S, C]
        return [block.cross.memory(img) for block in self.h]

    def forward(self, idx, memory, cache=None, start=0):
        """idx [N, T] token ids at positions start .. start + T - 1; memory from `memory()`;
        cache a KVCache (decoding) or None; start an int or a 0-dim tensor on idx's device
        (a captured step reads it from the device).

        Returns logits [N, T, V] and the last cross-attention block's attention
        [N, H, T, S] (None without cross-attention; unfolded only for that block).
        """
        N, T = idx.shape
        limit = self.cfg.n_ctx if cache is None else min(cache.length, self.cfg.n_ctx)
        if not torch.is_tensor(start) and start + T > limit:
            raise ValueError(f"sequence of {start + T} tokens exceeds GPT-2's context of {self.cfg.n_ctx}"
                             if limit == self.cfg.n_ctx else f"position {start + T - 1} is past the cache's {limit}")
        pos = torch.arange(T, device=idx.device) + start  # [T]
        x = self.wte(idx) + self.wpe(pos)  # [N, T, C]
        prefixes = self.prefix()  # [L, 2, P, C]: per layer (keys, values), or L times None
        last_att = None
        for i, block in enumerate(self.h):
            x, att = block(x, pos, memory[i], None if cache is None else (cache, i), prefixes[i])
            last_att = att if att is not None else last_att
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head, [N, T, V]
        return logits, None if last_att is None else CrossAttention.unfold_beams(last_att, N)

    # -- decoding -------------------------------------------------------------

    @staticmethod
    def _until_eot(rows: list, eot: int) -> list:
        """Token lists cut before their first <|endoftext|>."""
        return [row[:row.index(eot)] if eot in row else row for row in rows]

    @torch.no_grad()
    def sample(self, feats, n: int, max_len: int, eot: int, top_k: int = 0, top_p: float = 1.0,
               temperature: float = 1.0, generator=None) -> list:
        """n captions per image sampled with the key/value cache (self-critical training), as token
        lists without <|endoftext|>, image-major: image b's samples are rows b * n .. b * n + n - 1.

        The n samples of an image share its image tokens as beams do (`CrossAttention` folds them).
        top_k > 0 keeps the k likeliest tokens, top_p < 1 the likeliest holding probability top_p.
        """
        B, dev = feats.size(0), feats.device
        N = B * n
        memory = self.memory(feats)  # per block (keys, values), shared by the n samples of each image
        cache = KVCache(self.cfg.n_layer, max_len)
        token = torch.full((N, 1), eot, dtype=torch.long, device=dev)
        alive = torch.ones(N, dtype=torch.bool, device=dev)
        out = []
        for t in range(max_len):
            logits, _ = self(token, memory, cache, t)
            logits = logits[:, -1].float() / temperature  # [N, V]
            if t == 0:
                logits[:, eot] = float("-inf")  # a caption has at least one token
            nxt = sample_next(logits, top_k, top_p, generator)  # [N]
            nxt = torch.where(alive, nxt, torch.full_like(nxt, eot))
            out.append(nxt)
            alive = alive & (nxt != eot)
            if not alive.any():
                break
            token = nxt.unsqueeze(1)
        return self._until_eot(torch.stack(out, 1).tolist(), eot)

    @torch.no_grad()
    def beam_candidates(self, feats, beam_size: int, max_len: int, eot: int) -> list:
        """The beam_size final beams of every image (self-critical training on what beam search
        outputs), as token lists without <|endoftext|>, image-major like `sample`, each image's best
        first by summed log-probability.

        A beam that has ended stays in the beam: its one continuation is <|endoftext|> at no cost,
        so the K beams at the end are the K likeliest captions the search kept, ended or not.
        """
        B, K, dev = feats.size(0), beam_size, feats.device
        memory = self.memory(feats)
        cache = KVCache(self.cfg.n_layer, max_len)
        scores = torch.full((B, K), float("-inf"), device=dev)
        scores[:, 0] = 0.0  # one live beam per image: the K start identical
        seqs = torch.zeros(B * K, 0, dtype=torch.long, device=dev)
        token = torch.full((B * K, 1), eot, dtype=torch.long, device=dev)
        rows = torch.arange(B, device=dev).unsqueeze(1)
        alive = torch.ones(B * K, dtype=torch.bool, device=dev)
        for t in range(max_len):
            logits, _ = self(token, memory, cache, t)
            logp = logits[:, -1].float().log_softmax(-1)  # [N, V]
            if t == 0:
                logp[:, eot] = float("-inf")
            logp[~alive] = float("-inf")
            logp[~alive, eot] = 0.0
            V = logp.size(-1)
            top, idx = (scores.view(B * K, 1) + logp).view(B, K * V).topk(K, dim=1)  # [B, K], best first
            parent = (rows * K + torch.div(idx, V, rounding_mode="floor")).view(-1)  # [N]
            token = (idx % V).view(-1, 1)
            scores = top
            alive = alive[parent] & (token.squeeze(1) != eot)
            seqs = torch.cat([seqs[parent], token], dim=1)
            cache.reorder(parent)
            if not alive.any():
                break
        return self._until_eot(seqs.tolist(), eot)

    def can_capture(self, feats, cuda_graph: bool) -> bool:
        """Whether `beam_search(feats, ..., cuda_graph)` replays its step as a CUDA graph."""
        return bool(cuda_graph and feats.is_cuda and cuda_graph_unsupported() is None
                    and not any(p.requires_grad for p in self.parameters()))

    @torch.no_grad()
    def beam_search(self, feats, beam_size: int, max_len: int, eot: int, length_penalty: float = 0.0,
                    cuda_graph: bool = False) -> list:
        """Batched beam search with the key/value cache; captions as token lists (`BeamSearch`
        says how hypotheses end and are scored). With beam_size 1 this is greedy decoding,
        token for token (the only greedy decoder here).

        cuda_graph=True on CUDA captures one search step as a CUDA graph per batch shape and
        replays it: the same operations, so the same captions, without the host's per-step
        overhead. It needs a torch that can capture (`cuda_graph_unsupported`) and a frozen
        decoder (no parameter requiring grad: autocast then keeps no cached weight casts that a
        graph could capture); without either, and on the CPU, the steps run eagerly.
        """
        if length_penalty < 0:
            raise ValueError(f"length_penalty must be >= 0, got {length_penalty}")
        if not self.can_capture(feats, cuda_graph):
            return BeamSearch(self, feats, beam_size, max_len, eot, length_penalty).run()
        key = (tuple(feats.shape), feats.dtype, beam_size, max_len, float(length_penalty), eot,
               torch.is_autocast_enabled())
        cached = getattr(self, "_graph_search", None)
        if cached is not None and cached[0] == key:
            search = cached[1]
            search.restart(feats)
        else:
            self._graph_search = None  # one captured search at a time: free the last one's memory first
            search = BeamSearch(self, feats, beam_size, max_len, eot, length_penalty)
            search.capture()
            self._graph_search = (key, search)
        return search.run()


def cuda_graph_unsupported() -> str | None:
    """Why this torch cannot capture a CUDA graph, or None when it can. torch 1.x built with a CUDA
    older than 11.0, or for ROCm, raises "CUDA graphs may only be used in Pytorch built with CUDA >=
    11.0" on `torch.cuda.CUDAGraph()`; the graders' torch 1.12.1 from PyPI is a CUDA 10.2 build."""
    build = f"this torch ({torch.__version__})"
    if getattr(torch.version, "hip", None):
        return f"{build} is a ROCm build; CUDA graphs are used on CUDA builds only"
    cuda = torch.version.cuda
    if not cuda:
        return f"{build} is built without CUDA"
    if tuple(int(part) for part in cuda.split(".")[:2]) < (11, 0):
        return f"{build} is built with CUDA {cuda}; CUDA graphs need CUDA 11.0 or newer"
    return None


class BeamSearch:
    """One batched beam search over B images with K beams each, as fixed-shape tensor operations.

    A hypothesis ends when <|endoftext|> ranks among the top K candidates of its image (as in
    HuggingFace's beam search); it is scored by its summed log-probability / (tokens + 1) **
    length_penalty. An image is done once K hypotheses have ended, or when no live beam can
    beat its best ended one any more (log-probabilities only fall, so a live beam's bound is its
    score / max_len ** length_penalty). At max_len the live beams end without <|endoftext|>.

    `step()` reads and writes only this object's tensors, in place, the position included
    (`t`, on the device): no host synchronisation and no tensor that moves, so on CUDA it can be
    captured as a graph (`capture`) and replayed. `run()` steps until every image is done.
    """

    def __init__(self, decoder: Decoder, feats: torch.Tensor, beam_size: int, max_len: int, eot: int,
                 length_penalty: float):
        self.decoder = decoder
        self.memory = decoder.memory(feats)  # per block (keys, values), shared by an image's beams
        self.B, self.K, self.max_len, self.eot, self.lp = feats.size(0), beam_size, max_len, eot, float(length_penalty)
        B, K, dev = self.B, self.K, feats.device
        self.cache = KVCache(decoder.cfg.n_layer, max_len)
        self.rows = torch.arange(B, device=dev)
        self.rank = torch.arange(2 * K, device=dev)
        self.t = torch.zeros((), dtype=torch.long, device=dev)  # the step, 0-based
        self.scores = torch.empty(B, K, device=dev)
        self.seqs = torch.empty(B * K, max_len, dtype=torch.long, device=dev)
        self.token = torch.empty(B * K, 1, dtype=torch.long, device=dev)
        self.ended = torch.empty(B, dtype=torch.long, device=dev)
        self.best = torch.empty(B, device=dev)
        self.best_seq = torch.empty(B, max_len, dtype=torch.long, device=dev)
        self.best_len = torch.empty(B, dtype=torch.long, device=dev)
        self.done = torch.empty(B, dtype=torch.bool, device=dev)
        self.graph = None
        self._reset()

    def _reset(self) -> None:
        """The start: one live beam per image (the K start identical), nothing ended."""
        self.t.zero_()
        self.scores.fill_(float("-inf"))
        self.scores[:, 0] = 0.0
        self.seqs.zero_()
        self.token.fill_(self.eot)
        self.ended.zero_()
        self.best.fill_(float("-inf"))
        self.best_seq.zero_()
        self.best_len.zero_()
        self.done.zero_()

    def restart(self, feats: torch.Tensor) -> None:
        """Another batch of the same shape: its image tokens copied into this search's (a captured
        graph reads these tensors), the state back at the start."""
        for mine, new in zip(self.memory, self.decoder.memory(feats)):
            if mine is not None:
                mine[0].copy_(new[0])
                mine[1].copy_(new[1])
        self._reset()

    def step(self) -> None:
        B, K, eot, t = self.B, self.K, self.eot, self.t
        logits, _ = self.decoder(self.token, self.memory, self.cache, t)
        logp = logits[:, -1].float().log_softmax(-1)  # [N, V]
        logp[:, eot].masked_fill_(t == 0, float("-inf"))  # a caption has at least one token
        V = logp.size(-1)
        top, idx = (self.scores.view(B * K, 1) + logp).view(B, K * V).topk(2 * K, dim=1)  # [B, 2K]
        beam, tok = torch.div(idx, V, rounding_mode="floor"), idx % V  # tensor // warns on torch 1.12
        is_eot = tok == eot
        # ended hypotheses: <|endoftext|> among the top K candidates
        new = is_eot & (self.rank < K) & ~self.done.unsqueeze(1)
        normed = torch.where(new, top / (t + 1).float() ** self.lp, torch.full_like(top, float("-inf")))
        cand_best, arg = normed.max(1)  # [B]
        better = cand_best > self.best
        src = self.seqs.view(B, K, self.max_len)[self.rows, beam.gather(1, arg.unsqueeze(1)).squeeze(1)]  # [B, LC]
        self.best_seq.copy_(torch.where(better.unsqueeze(1), src, self.best_seq))  # positions >= t hold zeros
        self.best_len.copy_(torch.where(better, t, self.best_len))
        self.best.copy_(torch.where(better, cand_best, self.best))
        self.ended.add_(new.sum(1))
        # live beams: the best K candidates that do not end
        order = (is_eot.long() * 2 * K + self.rank).argsort(dim=1)[:, :K]  # [B, K]
        self.scores.copy_(top.gather(1, order))
        parent = (self.rows.unsqueeze(1) * K + beam.gather(1, order)).view(-1)  # [N]
        self.token.copy_(tok.gather(1, order).view(-1, 1))
        self.seqs.copy_(self.seqs.index_select(0, parent))
        self.seqs.index_copy_(1, t.view(1), self.token)
        self.cache.reorder(parent)
        bound = self.scores.max(1).values / float(self.max_len) ** self.lp
        self.done.logical_or_(self.ended >= K).logical_or_(self.best >= bound)
        t.add_(1)

    def capture(self) -> None:
        """Record `step` as a CUDA graph: run twice on a side stream first (lazy allocations,
        library workspaces), then back to the start and capture (capturing runs nothing)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        self._reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step()
        self.graph = graph

    def run(self) -> list:
        """Step until every image is done or max_len is reached; the captions as token lists."""
        for _ in range(self.max_len):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()
            if bool(self.done.all()):
                break
        else:
            # max_len reached: live beams end here without <|endoftext|>
            B, K = self.B, self.K
            live, arg = (self.scores / float(self.max_len) ** self.lp).max(1)
            better = ~self.done & (live > self.best)
            last = self.seqs.view(B, K, self.max_len)[self.rows, arg]  # [B, LC]
            self.best_seq.copy_(torch.where(better.unsqueeze(1), last, self.best_seq))
            self.best_len.copy_(torch.where(better, torch.full_like(self.best_len, self.max_len), self.best_len))
        seqs, lengths = self.best_seq.tolist(), self.best_len.tolist()
        return [row[:n] for row, n in zip(seqs, lengths)]


# -- loading GPT-2 --------------------------------------------------------------


def infer_gpt2_shape(state: dict) -> dict:
    """n_layer, n_embd, vocab_size, n_ctx read off the course's weight tensors."""
    for key in ("wte.weight", "wpe.weight"):
        if key not in state:
            found = ", ".join(sorted(state)[:5])
            raise ValueError(f"not a GPT-2 decoder state dict: no {key!r} (first keys: {found}); "
                             "expected the course's decoder_model.bin layout (wte, wpe, h.N.*, ln_f)")
    layers = {int(k.split(".")[1]) for k in state if k.startswith("h.") and k.split(".")[1].isdigit()}
    if not layers or layers != set(range(len(layers))):
        raise ValueError(f"GPT-2 blocks h.N must be numbered 0..L-1, found {sorted(layers)}")
    vocab, width = state["wte.weight"].shape
    return dict(n_layer=len(layers), n_embd=int(width), vocab_size=int(vocab), n_ctx=int(state["wpe.weight"].shape[0]))


def gpt2_shapes(n_layer: int, n_embd: int, vocab_size: int, n_ctx: int) -> dict:
    """Name -> shape of every GPT-2 tensor, in this module's layout (Conv1D weights as (out, in))."""
    C = n_embd
    block = {"ln_1.weight": (C,), "ln_1.bias": (C,),
             "attn.c_attn.weight": (3 * C, C), "attn.c_attn.bias": (3 * C,),
             "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
             "ln_2.weight": (C,), "ln_2.bias": (C,),
             "mlp.c_fc.weight": (4 * C, C), "mlp.c_fc.bias": (4 * C,),
             "mlp.c_proj.weight": (C, 4 * C), "mlp.c_proj.bias": (C,)}
    shapes = {"wte.weight": (vocab_size, C), "wpe.weight": (n_ctx, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(n_layer):
        shapes.update({f"h.{i}.{name}": shape for name, shape in block.items()})
    return shapes


def _describe_non_tensors(state) -> str:
    """What a weights file that is not a flat dict of tensors holds instead, for error messages."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}"
    if {"config", "state_dict"} <= set(state):
        return "a captioner checkpoint ({config, state_dict}, as p2_train.py saves): that goes in HW3_P2_CKPT"
    def kind(value) -> str:
        if isinstance(value, dict) and value and all(torch.is_tensor(v) for v in value.values()):
            return f"a dict of {len(value)} tensors"
        return f"a {type(value).__name__}"

    others = [(k, v) for k, v in state.items() if not torch.is_tensor(v)]
    shown = ", ".join(f"{k!r}: {kind(v)}" for k, v in others[:5])
    return f"a dict whose values are not all tensors ({shown})"


def load_gpt2_state(path: str, check_values: bool = True) -> dict:
    """The course's decoder_model.bin as tensors in this module's layout.

    Checks what the course's template never does: every key is a GPT-2 key,
    nothing is missing, every shape fits (the vocabulary is GPT-2's 50257
    tokens), every value is finite (unless `check_values` is False: the caller
    checks them where they end up), and the four Conv1D weights are transposed
    for nn.Linear.
    """
    state = torch_load(path, mmap=True)  # guarded in torch_load
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} holds {_describe_non_tensors(state)}; expected the course's decoder_model.bin, "
                         "a flat dict of GPT-2 tensors (wte.weight, wpe.weight, h.N.*, ln_f.*)")
    if not state:
        raise ValueError(f"{path} holds an empty dict; expected the course's decoder_model.bin, a flat dict of "
                         "GPT-2 tensors (wte.weight, wpe.weight, h.N.*, ln_f.*)")
    check_weight_tensors(state, path, floating=False)  # string names, dense: before the names are read
    if any(k.startswith("transformer.") for k in state):
        raise ValueError(f"{path} is a `transformers` GPT2LMHeadModel state dict (keys 'transformer.wte.weight', "
                         "...); expected the course's decoder_model.bin layout without the 'transformer.' prefix "
                         "(GPT2Model's state_dict: wte, wpe, h.N.*, ln_f)")
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED_BUFFERS)}
    check_weight_tensors(state, path)  # every GPT-2 weight floating-point (the mask buffers above are bool)
    try:
        shape = infer_gpt2_shape(state)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    if shape["vocab_size"] != GPT2_SMALL["vocab_size"]:  # the tokenizer's ids index these rows
        raise ValueError(f"{path}: wte.weight has {shape['vocab_size']} rows, expected GPT-2's "
                         f"{GPT2_SMALL['vocab_size']} (one per token of its vocabulary; a copy padded to a "
                         "rounder size or cut short does not fit the tokenizer)")
    expected = gpt2_shapes(**shape)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} is not the course's GPT-2 layout: missing {missing[:8]} "
                         f"({len(missing)} in all), unexpected {unexpected[:8]} ({len(unexpected)} in all)")
    if check_values:
        check_finite(state, path)
    out = {}
    for key, tensor in state.items():
        if key.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        if tuple(tensor.shape) != expected[key]:
            raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, expected {expected[key]} "
                             "(after transposing the Conv1D weights)")
        out[key] = tensor.float().contiguous()
    return out


def gpt2_course_state(state: dict) -> dict:
    """The GPT-2 tensors of a decoder state dict in the course's decoder_model.bin layout
    (the inverse of load_gpt2_state): no new (PEFT or cross-attention) tensors, Conv1D weights (in, out)."""
    return {k: (v.t() if k.endswith(CONV1D_WEIGHTS) else v).contiguous()
            for k, v in state.items() if parameter_group(k) is None}


def load_gpt2_into(decoder: Decoder, state: dict, source: str = "GPT-2 weights", device=None) -> None:
    """Put GPT-2's tensors into `decoder` (on `device`); every parameter left out must be a new
    (trainable) one, which the caller initialises or loads."""
    missing = assign_state(decoder, state, source, device)
    not_new = [k for k in missing if parameter_group(k) is None]
    if not_new:
        raise ValueError(f"{source} does not fit the decoder: {len(not_new)} GPT-2 tensors missing, e.g. {not_new[:3]}")
    check_finite({k: v for k, v in decoder.state_dict().items() if k in state}, source)  # on a GPU: free
