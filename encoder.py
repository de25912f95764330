"""The frozen ViT image encoder of the captioner (timm).

Default: OpenAI's CLIP ViT-L/14 image tower. timm's plain `*_clip_*` names
build a GELU tower that does not match OpenAI's weights (trained with
QuickGELU), so the default is the `*_clip_quickgelu_*` name with the
`.openai` tag (without a tag timm picks another pretraining).

Weights come from, in order: an explicit file, the repository cache that
`hw3_download.sh` fills (`cache/timm/<name>.pth`), or timm's own download
(announced on stderr, refused under HF_HUB_OFFLINE=1). Loading is checked:
every encoder tensor must be found in the file; only the classifier head,
which the captioner drops, may be left over.

The encoder brings its own preprocessing (timm's data config) and width.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn

from io_utils import atomic_torch_save, cache_dir, check_finite, torch_load

DEFAULT_ENCODER = "vit_large_patch14_clip_quickgelu_224.openai"


def cached_weights_path(name: str) -> str:
    return cache_dir("timm", name.replace("/", "_") + ".pth")


def download_weights(name: str) -> str:
    """Fetch `name`'s pretrained weights through timm and store them in the repository cache.

    A `*_clip_quickgelu_*` name is fetched under its plain `*_clip_*` name: the
    tensors are the same (QuickGELU is an activation, not a weight), and timm
    0.9.10 derives hub ids for the quickgelu names (`timm/<quickgelu name>`)
    that a later timm release replaced with the plain names' repositories
    ("Fix openai quickgelu loading"); the plain ids work in both.
    """
    import timm

    path = cached_weights_path(name)
    source = name.replace("_clip_quickgelu_", "_clip_")
    print(f"downloading encoder weights {source!r} into {path}", file=sys.stderr)
    model = timm.create_model(source, pretrained=True)
    atomic_torch_save(model.state_dict(), path)
    return path


def read_state_dict(path: str) -> dict:
    """Tensors from a .pth/.bin/.safetensors file, unwrapping {'state_dict': ...} style containers;
    ValueError naming any tensor that holds NaN or inf."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"encoder weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch_load(path)
        for key in ("state_dict", "model", "state"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    check_finite(state, path)
    return state


class ImageEncoder(nn.Module):
    """A timm ViT returning all its tokens, [B, S, width]; frozen and always in eval mode.

    `pretrained=False` builds random weights (parameter counts, benchmarks).
    `model_kwargs` go to timm.create_model (tests build small ViTs with them).
    """

    def __init__(self, name: str = DEFAULT_ENCODER, weights: str | None = None, pretrained: bool = True,
                 model_kwargs: dict | None = None):
        super().__init__()
        import timm

        self.name = name
        self.model_kwargs = dict(model_kwargs or {})
        try:
            self.vit = timm.create_model(name, pretrained=False, num_classes=0, **self.model_kwargs)
        except RuntimeError as error:  # timm's "Unknown model"
            raise ValueError(f"encoder {name!r} is not a timm model ({error}); "
                             f"e.g. {DEFAULT_ENCODER!r}") from error
        if not hasattr(self.vit, "patch_embed") or not hasattr(self.vit, "num_prefix_tokens"):
            raise ValueError(f"encoder {name!r} is not a ViT (no patch_embed / num_prefix_tokens)")
        self.weights = None
        if pretrained:
            self.weights = weights or cached_weights_path(name)
            if weights is None and not os.path.isfile(self.weights):
                if os.environ.get("HF_HUB_OFFLINE") == "1":
                    raise FileNotFoundError(f"encoder weights for {name!r} not in {self.weights} and "
                                            "HF_HUB_OFFLINE=1; run `bash hw3_download.sh` first")
                download_weights(name)
            self._load(self.weights)
        self.requires_grad_(False)
        self.vit.eval()

        data = timm.data.resolve_data_config({}, model=self.vit)
        # model_kwargs may change the input size; the pretrained config would not know
        data["input_size"] = (3, *self.vit.patch_embed.img_size)
        self.data_config = data
        self.transform = timm.data.create_transform(**data)

    def _load(self, path: str) -> None:
        from timm.models.vision_transformer import checkpoint_filter_fn

        # converts OpenAI / open_clip layouts and resamples position embeddings when needed
        state = checkpoint_filter_fn(read_state_dict(path), self.vit)
        missing, unexpected = self.vit.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.startswith("head.")]  # the classifier we drop
        if missing or unexpected:
            raise ValueError(f"encoder weights {path!r} do not fit {self.name!r}: missing {missing[:8]} "
                             f"({len(missing)} in all), unexpected {unexpected[:8]} ({len(unexpected)} in all)")

    @property
    def width(self) -> int:
        return self.vit.num_features

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patch tokens (class token, registers)."""
        return self.vit.num_prefix_tokens

    @property
    def grid(self) -> tuple:
        """Patch grid (rows, columns)."""
        return tuple(self.vit.patch_embed.grid_size)

    def describe(self) -> dict:
        """What determines the features: keys the feature cache."""
        return dict(name=self.name, model_kwargs=self.model_kwargs, data_config=repr(sorted(self.data_config.items())),
                    weights=_file_identity(self.weights))

    def train(self, mode: bool = True):
        super().train(mode)
        self.vit.eval()  # frozen: dropout and the like stay off
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] preprocessed by `self.transform` -> tokens [B, S, width]"""
        return self.vit.forward_features(images)


def _file_identity(path: str | None):
    if path is None:
        return "random"
    stat = os.stat(path)
    return f"{os.path.abspath(path)}:{stat.st_size}:{int(stat.st_mtime)}"
