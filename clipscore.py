"""CLIPScore, as the course's evaluator computes it: for each image and its caption,
2.5 * max(cos(CLIP image embedding, CLIP text embedding), 0), with CLIP ViT-B/32
and CLIP's own preprocessing; the score of a set is the mean.

Used by p2_evaluate.py (the course's command line) and by p2_train.py
(validation), so it lives here, under both. Unlike the course's script it
cuts a caption longer than CLIP's 77-token context at a word boundary (with a warning) and
takes images of any extension. fp16 on CUDA (as `clip.load` gives it), fp32 on
the CPU. CLIP itself is built from plain weights by clip_weights.py (never
through `clip.load`, which runs code from the file it reads).
"""
from __future__ import annotations

import sys

from clip_context import fit_clip_context
from image_io import find_images, open_rgb
from io_utils import InputError, loader_workers, pick_device, warn


def load_clip(model_name_or_file: str, device):
    """(model, preprocess): clip_weights.load_clip of a local weights file, or of an OpenAI model name from
    the cache, fetched into it when missing; InputError saying what to do when that fails."""
    import clip_weights

    return clip_weights.load_clip(model_name_or_file, device,
                                  purpose="; or pass --clip-model FILE, a local CLIP weights file")


def clip_text_tokens(texts: list[str], context_length: int):
    """CLIP token ids of `texts`, each cut to the context at a word boundary
    (`clip_context.fit_clip_context`, as p2_inference cuts its captions), with a warning that counts them."""
    import clip

    fitted = [fit_clip_context(text, context_length) for text in texts]
    cut = sum(fit != text for fit, text in zip(fitted, texts))
    if cut:
        warn(f"{cut} caption(s) longer than CLIP's {context_length}-token context were truncated for CLIPScore "
             "(the course's scorer stops with an error on them)")
    return clip.tokenize(fitted, context_length=context_length)


class _Images:
    """The images of a list of paths, preprocessed for CLIP (a torch Dataset)."""

    def __init__(self, keys: list[str], paths: dict[str, str], preprocess):
        self.keys, self.paths, self.preprocess = keys, paths, preprocess

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        path = self.paths[self.keys[i]]
        try:
            image = open_rgb(path)
        except OSError as e:
            raise InputError(f"cannot read the image of key {self.keys[i]!r} ({path}): {e}") from None
        return self.preprocess(image)


def clip_scores(preds: dict, images_root: str, model_name_or_file: str = "ViT-B/32",
                device="auto", batch_size: int = 64, workers: int | None = None, loaded=None) -> dict[str, float]:
    """CLIPScore of each prediction: 2.5 * max(cos(image embedding, caption embedding), 0).

    preds: key -> caption; the image of key k is `<images_root>/<k>.<ext>`
    (image_io.find_images); device: "auto", "cpu", "cuda" or a torch.device;
    loaded: `load_clip(model_name_or_file, device)`'s result when the caller loaded it already.
    Returns {key: score}; the course's CLIPScore is the mean of the values.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    keys = sorted(preds)
    paths = find_images(images_root, keys)
    device = pick_device(device)
    model, preprocess = loaded or load_clip(model_name_or_file, device)
    model.eval()
    tokens = clip_text_tokens([preds[k] for k in keys], model.context_length)  # (N, 77)
    if workers is None:
        workers = loader_workers(device)
    loader = DataLoader(_Images(keys, paths, preprocess), batch_size=batch_size,
                        shuffle=False, num_workers=workers)
    scores = []
    with torch.no_grad():
        for images in tqdm(loader, desc="CLIPScore", unit="batch", file=sys.stderr):
            start = len(scores)
            text = tokens[start:start + len(images)].to(device)  # (B, 77)
            image_emb = model.encode_image(images.to(device, model.dtype)).float()  # (B, D)
            text_emb = model.encode_text(text).float()  # (B, D)
            cos = F.cosine_similarity(image_emb, text_emb, dim=-1)  # (B,)
            scores += (2.5 * cos.clamp(min=0)).tolist()
    return dict(zip(keys, scores))
