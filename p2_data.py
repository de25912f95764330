"""Problem 2 training data: captions as token sequences, images or cached ViT features.

The course's alignment (its 11/27 clarification): for caption ids t1..tN

    input   [<|endoftext|>, t1, ..., tN, <|endoftext|>, pad, ...]   pad = 50256
    target  [t1, ..., tN, <|endoftext|>, -100, ...]                 -100 = ignored

so the logits at position i predict token i + 1, and padding never trains
(`make_batch`; the input's trailing <|endoftext|> sits where the target is
already ignored).

Captions are normalised before tokenising: whitespace collapsed and stripped,
and Flickr30k's detached final " ." attached ("a dog runs ." -> "a dog runs.").
Generated captions are stripped anyway, and a leading space would make the
first token depend on which dataset the caption came from (" a" is 257, "a" 64).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from captioner import autocast
from file_io import atomic_output, atomic_write_text, load_references
from image_io import find_images, open_rgb
from io_utils import InputError
from tokenizer import EOT_ID

IGNORE_INDEX = -100
MAX_CAPTION_TOKENS = 64  # the longest training caption is 57 BPE tokens


def normalize_caption(text: str) -> str:
    text = " ".join(text.split())
    if text.endswith(" ."):
        text = text[:-2] + "."
    return text


def make_batch(captions: list, ended: list | None = None):
    """Token lists -> (input, target), each [B, T] long, T = longest + 1.

    `ended[i]` False marks a caption cut off without <|endoftext|> (a sample
    that ran to the length limit): its target gets no end token.
    """
    B, T = len(captions), max(len(c) for c in captions) + 1
    inp = torch.full((B, T), EOT_ID, dtype=torch.long)
    tgt = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for i, ids in enumerate(captions):
        n = len(ids)
        inp[i, 1:n + 1] = torch.tensor(ids, dtype=torch.long)
        tgt[i, :n] = torch.tensor(ids, dtype=torch.long)
        if ended is None or ended[i]:
            tgt[i, n] = EOT_ID
    return inp, tgt


class Split:
    """One split of the course's layout: `ROOT/images/NAME/`, `ROOT/NAME.json`.

    keys sorted; `paths[i]`, `refs[keys[i]]`; `samples` = (image index, token ids), one per caption
    with any text (`empty_captions` counts the others).
    Raises InputError for a missing folder, a malformed caption file or a listed image that is absent.
    """

    def __init__(self, root: str, name: str, tokenizer):
        images = os.path.join(root, "images", name)
        annotations = os.path.join(root, name + ".json")
        if not os.path.isdir(images):
            raise InputError(f"image folder {images!r} does not exist (expected ROOT/images/{name}/)")
        self.name = name
        self.images_dir = images
        self.refs = load_references(annotations)
        self.keys = sorted(self.refs)
        found = find_images(images, self.keys)
        self.paths = [found[k] for k in self.keys]
        self.samples = []
        self.empty_captions = 0
        for index, key in enumerate(self.keys):
            for caption in self.refs[key]:
                ids = tokenizer.encode(normalize_caption(caption))[:MAX_CAPTION_TOKENS]
                if ids:
                    self.samples.append((index, ids))
                else:
                    self.empty_captions += 1


class ImageFiles(Dataset):
    """Preprocessed images; a training image that cannot be read is an error naming it."""

    def __init__(self, paths: list, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            return self.transform(open_rgb(self.paths[index]))
        except OSError as error:
            raise InputError(f"cannot read image {self.paths[index]!r}: {error}") from None


def _file_list(paths: list) -> list:
    return [[os.path.basename(p), os.path.getsize(p), int(os.path.getmtime(p))] for p in paths]


class FeatureCache(Dataset):
    """The frozen encoder's tokens for every image of a split, fp16 in one .npy on disk.

    The ViT runs once per image; later epochs read rows from a memory map.
    The folder is keyed by everything that determines the features (encoder
    name and options, weights file, preprocessing), and the split's file
    list (names, sizes, times) must match, so a stale cache is never read.
    The index is written last: an interrupted build is simply rebuilt.
    """

    def __init__(self, folder: str, encoder, split: Split, device, batch_size: int = 64, workers: int = 0):
        key = hashlib.sha1(json.dumps(encoder.describe(), sort_keys=True).encode()).hexdigest()[:16]
        self.folder = os.path.join(folder, key)
        array_path = os.path.join(self.folder, split.name + ".npy")
        index_path = os.path.join(self.folder, split.name + ".json")
        files = _file_list(split.paths)
        index = None
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
        if index is None or index.get("files") != files or not os.path.isfile(array_path):
            self._build(encoder, split, array_path, device, batch_size, workers)
            atomic_write_text(os.path.join(self.folder, "encoder.json"), json.dumps(encoder.describe(), indent=1))
            atomic_write_text(index_path, json.dumps({"files": files}))
        self.array = np.load(array_path, mmap_mode="r")  # [N, S, W] fp16

    @staticmethod
    @torch.no_grad()
    def _build(encoder, split, array_path, device, batch_size, workers):
        loader = DataLoader(ImageFiles(split.paths, encoder.transform), batch_size=batch_size, num_workers=workers)
        array, start = None, 0
        encoder = encoder.to(device).eval()
        with atomic_output(array_path) as tmp:
            for images in tqdm(loader, desc=f"caching {split.name} features", unit="batch", file=sys.stderr):
                with autocast(device):
                    feats = encoder(images.to(device)).half().cpu().numpy()  # [B, S, W]
                if array is None:
                    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                                      shape=(len(split.paths),) + feats.shape[1:])
                array[start:start + len(feats)] = feats
                start += len(feats)
            array.flush()
            del array

    def __len__(self):
        return len(self.array)

    def __getitem__(self, index):
        return torch.from_numpy(np.array(self.array[index]))


class CaptionSamples(Dataset):
    """(image or features, caption ids) per caption; `images` indexes by image."""

    def __init__(self, samples: list, images: Dataset):
        self.samples, self.images = samples, images

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        image_index, ids = self.samples[index]
        return self.images[image_index], ids


def collate_captions(items):
    """-> images or features stacked, input [B, T], target [B, T]"""
    inp, tgt = make_batch([ids for _, ids in items])
    return torch.stack([x for x, _ in items]), inp, tgt


class EpochSampler(Sampler):
    """A fixed permutation per (seed, epoch), from position `start`: a resumed run sees the
    batches the interrupted one would have seen."""

    def __init__(self, n: int, seed: int, epoch: int, start: int = 0):
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator)[self.start:].tolist())

    def __len__(self):
        return max(self.n - self.start, 0)
