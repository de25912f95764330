"""The frozen ViT image encoder of the captioner (timm).

Default: OpenAI's CLIP ViT-L/14 image tower. timm's plain `*_clip_*` names
build a GELU tower that does not match OpenAI's weights (trained with
QuickGELU), so the default is the `*_clip_quickgelu_*` name with the
`.openai` tag (without a tag timm picks another pretraining).

Weights come from, in order (`find_weights`): an explicit file; the file a
checkpoint was trained with, when it is still there unchanged (a checkpoint
trained from a named file records its path and SHA-256: `weights_record`);
the repository cache that `hw3_download.sh` fills (`cache/timm/<name>.pth`);
or timm's own download (announced on stderr, refused under HF_HUB_OFFLINE=1
and for a checkpoint trained from a file, whose weights the hub may not have:
those fail at once, saying how to supply the file). Loading is checked:
every encoder tensor must be found in the file; only the classifier head,
which the captioner drops, may be left over. With weights, the ViT is built
without its random initialisation (`weights.skip_init`) and the file's tensors
are put in place on the target device (`weights.assign_state`).

The encoder brings its own preprocessing (timm's data config) and width.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys

import torch
import torch.nn as nn

from file_io import atomic_torch_save
from io_utils import cache_dir, make_cache_folder
from weights import assign_state, check_finite, check_weight_tensors, skip_init, torch_load

DEFAULT_ENCODER = "vit_large_patch14_clip_quickgelu_224.openai"


def cached_weights_path(name: str, root: str | None = None) -> str:
    """Where the cache under `root` (default: $HW3_CACHE, else the repository's) keeps `name`'s weights."""
    file = name.replace("/", "_") + ".pth"
    return os.path.join(root, "timm", file) if root else cache_dir("timm", file)


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
    make_cache_folder(path)  # before the download
    source = name.replace("_clip_quickgelu_", "_clip_")
    print(f"downloading encoder weights {source!r} into {path}", file=sys.stderr)
    model = timm.create_model(source, pretrained=True)
    atomic_torch_save(model.state_dict(), path)
    return path


@functools.lru_cache(maxsize=None)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    """SHA-256 of a file, computed once per version of it (path, size, modification time)."""
    stat = os.stat(path)
    return _sha256(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


def is_recorded_file(recorded) -> bool:
    """Whether `weights_record`'s record names a file that is here, unchanged (size, then SHA-256)."""
    if not isinstance(recorded, dict) or not all(isinstance(recorded.get(k), str) for k in ("path", "sha256")):
        return False
    path = recorded["path"]
    return (os.path.isfile(path) and recorded.get("bytes") in (None, os.path.getsize(path))
            and file_sha256(path) == recorded["sha256"])


def find_weights(name: str, weights: str | None = None, recorded: dict | None = None):
    """The file to load `name`'s pretrained weights from, or None where timm is to download them.

    `weights` when given; else the file a checkpoint was trained with (`recorded`), if it is still
    there unchanged; else the repository cache. Never None for a checkpoint trained from a file
    (the hub need not have those weights) or under HF_HUB_OFFLINE=1: FileNotFoundError, at once,
    saying how to supply the file.
    """
    if weights:
        return weights
    if is_recorded_file(recorded):
        return recorded["path"]
    cached = cached_weights_path(name)
    if os.path.isfile(cached):
        return cached
    fix = (f"pass the weights file (hw3_2.sh and p2_inference.py: HW3_P2_ENCODER_WEIGHTS=FILE), or run "
           f"`bash hw3_download.sh`, which fetches {name!r} into the cache")
    if isinstance(recorded, dict) and recorded.get("path"):
        state = "has changed since" if os.path.isfile(recorded["path"]) else "is no longer there"
        raise FileNotFoundError(f"encoder weights for {name!r}: the checkpoint was trained with {recorded['path']} "
                                f"(SHA-256 {str(recorded.get('sha256'))[:12]}...), which {state}, and {cached} "
                                f"does not exist; {fix}")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"encoder weights for {name!r} not in {cached} and HF_HUB_OFFLINE=1 (no hub); {fix}")
    return None


def read_state_dict(path: str, check: bool = True) -> dict:
    """Tensors from a .pth/.bin/.safetensors file, unwrapping {'state_dict': ...} style containers;
    ValueError naming any tensor that holds NaN or inf (unless `check` is False: the caller checks
    them where they end up, e.g. on the GPU, where that pass costs nothing)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"encoder weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch_load(path, mmap=True)  # guarded in torch_load
        for key in ("state_dict", "model", "state"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    check_weight_tensors(state, path, floating=False)  # before timm's filter reads the names
    if check:
        check_finite(state, path)
    return state


class ImageEncoder(nn.Module):
    """A timm ViT returning all its tokens, [B, S, width]; frozen and always in eval mode.

    `pretrained=False` builds random weights (parameter counts, benchmarks).
    `model_kwargs` go to timm.create_model (tests build small ViTs with them).
    `recorded`: the checkpoint's record of the file it was trained with (`find_weights`).
    """

    def __init__(self, name: str = DEFAULT_ENCODER, weights: str | None = None, pretrained: bool = True,
                 model_kwargs: dict | None = None, device=None, recorded: dict | None = None):
        super().__init__()
        import timm

        self.name = name
        self.model_kwargs = dict(model_kwargs or {})
        # where the weights come from, decided (a missing file reported) before the ViT is built
        found = find_weights(name, weights, recorded) if pretrained and timm.is_model(name) else None
        self.named_file = found if found is not None and found != cached_weights_path(name) else None
        # a file at hand is read before the ViT's (never written) tensors are allocated, so that its
        # tensors take the memory the process has freed rather than fresh pages (bench/bench_load.py)
        state = read_state_dict(found, check=False) if found else None
        try:
            self.vit = _create_vit(name, self.model_kwargs, initialise=not pretrained)
        except RuntimeError as error:  # timm's "Unknown model"
            raise ValueError(f"encoder {name!r} is not a timm model ({error}); "
                             f"e.g. {DEFAULT_ENCODER!r}") from error
        if not hasattr(self.vit, "patch_embed") or not hasattr(self.vit, "num_prefix_tokens"):
            raise ValueError(f"encoder {name!r} is not a ViT (no patch_embed / num_prefix_tokens)")
        self.weights = None
        if pretrained:
            self.weights = found or download_weights(name)
            if state is None:  # downloaded just now
                state = read_state_dict(self.weights, check=False)
            self._load(state, self.weights, device)
            del state  # the file's tensors: those the model did not take (another dtype or device) go now
        self.requires_grad_(False)
        self.vit.eval()

        data = timm.data.resolve_data_config({}, model=self.vit)
        # model_kwargs may change the input size; the pretrained config would not know
        data["input_size"] = (3, *self.vit.patch_embed.img_size)
        self.data_config = data
        self.transform = timm.data.create_transform(**data)

    def _load(self, state: dict, path: str, device=None) -> None:
        """Put `state` (read from `path`) in place of the ViT's tensors, on `device`."""
        from timm.models.vision_transformer import checkpoint_filter_fn

        # converts OpenAI / open_clip layouts and resamples position embeddings when needed
        state = checkpoint_filter_fn(state, self.vit)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}  # the classifier we drop
        missing = assign_state(self.vit, state, f"encoder weights {path!r} for {self.name!r}", device)
        if missing:  # built without initialisation: a tensor the file lacks would be garbage
            raise ValueError(f"encoder weights {path!r} do not fit {self.name!r}: {len(missing)} of its tensors "
                             f"are not in the file, e.g. {missing[:3]}")
        check_finite(self.vit.state_dict(), path)  # where the tensors now are: on a GPU this pass is free

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

    def weights_record(self):
        """{path, bytes, sha256} of the file the weights came from when it was named rather than the
        cache's (None otherwise): a checkpoint keeps it, so that inference finds the same file again."""
        if self.named_file is None:
            return None
        path = os.path.abspath(self.named_file)
        return {"path": path, "bytes": os.path.getsize(path), "sha256": file_sha256(path)}

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


def _create_vit(name: str, model_kwargs: dict, initialise: bool):
    """timm's model `name`; without `initialise` its random initialisation is skipped (weights follow),
    and whatever random numbers its constructor still draws come from a forked generator, so that the
    global one (which then initialises the captioner's new modules) does not depend on the encoder."""
    import timm
    from timm.models import model_entrypoint, split_model_name_tag

    kwargs = dict(pretrained=False, num_classes=0, **model_kwargs)
    if not initialise and model_entrypoint(split_model_name_tag(name)[0]).__module__.endswith(".vision_transformer"):
        kwargs["weight_init"] = "skip"  # VisionTransformer's own switch for its init_weights()
    with torch.random.fork_rng(devices=[], enabled=not initialise), skip_init(not initialise):
        return timm.create_model(name, **kwargs)


def _file_identity(path: str | None):
    if path is None:
        return "random"
    stat = os.stat(path)
    return f"{os.path.abspath(path)}:{stat.st_size}:{int(stat.st_mtime)}"
