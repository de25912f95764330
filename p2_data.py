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
A caption holding GPT-2's end-of-text marker `<|endoftext|>` is refused with an
error naming the file, the image and the caption: it is a fault in the file,
and quietly editing it would train on text nobody wrote (a lone surrogate such
as "\\ud800", which UTF-8 cannot encode, is refused already when the file is
read: `file_io.read_json`).

Every image of both splits is decoded once before the first step
(`prepare_images`: the feature cache does it while caching, otherwise a
check pass does), so that a bad file cannot end a run hours in. An image that
cannot be read (corrupt, truncated, over Pillow's decompression-bomb limit)
is skipped with a warning naming it, its captions left out and counted, as
inference skips one; p2_train.py's --strict-data makes it an error instead.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm import tqdm

from captioner import autocast
from file_io import atomic_output, atomic_write_text, load_references
from image_io import find_images, open_rgb
from io_utils import InputError, warn
from tokenizer import EOT, EOT_ID

IGNORE_INDEX = -100
MAX_CAPTION_TOKENS = 64  # the longest training caption is 57 BPE tokens


def normalize_caption(text: str) -> str:
    text = " ".join(text.split())
    if text.endswith(" ."):
        text = text[:-2] + "."
    return text


def encode_caption(tokenizer, caption: str, source: str, key: str) -> list:
    """The caption's token ids (normalised, at most MAX_CAPTION_TOKENS); InputError naming
    `source`, the image `key` and the caption when it cannot be a training target."""
    try:
        return tokenizer.encode(normalize_caption(caption))[:MAX_CAPTION_TOKENS]
    except ValueError as error:  # the tokenizer refuses <|endoftext|>
        if EOT in caption:
            why = f"it holds {EOT!r}, GPT-2's end-of-text marker, which only the trainer may place"
        else:
            why = str(error)
        shown = caption if len(caption) <= 120 else caption[:117] + "..."
        raise InputError(f"{source}: the caption {shown!r} of image {key!r} cannot be trained on: {why}; "
                         "fix or remove it") from None


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
    with any text (`empty_captions` counts the others). `drop_images` leaves out unreadable images
    (`skipped`: path -> why) with their captions (`dropped_captions`).
    Raises InputError for a missing folder, a malformed caption file, a listed image that is absent
    or a caption that cannot be encoded (encode_caption).
    """

    def __init__(self, root: str, name: str, tokenizer):
        images = os.path.join(root, "images", name)
        annotations = os.path.join(root, name + ".json")
        if not os.path.isdir(images):
            raise InputError(f"image folder {images!r} does not exist (expected ROOT/images/{name}/)")
        self.name = name
        self.images_dir, self.annotations = images, annotations
        self.refs = load_references(annotations)
        self.keys = sorted(self.refs)
        found = find_images(images, self.keys)
        self.paths = [found[k] for k in self.keys]
        self.samples = []
        self.empty_captions = 0
        for index, key in enumerate(self.keys):
            for caption in self.refs[key]:
                ids = encode_caption(tokenizer, caption, annotations, key)
                if ids:
                    self.samples.append((index, ids))
                else:
                    self.empty_captions += 1
        self.skipped, self.dropped_captions = {}, 0

    def drop_images(self, unreadable: dict) -> list:
        """Leave out the images `unreadable` (index -> why) and all their captions; -> the indices
        kept, in the old numbering (the samples are renumbered)."""
        kept = [i for i in range(len(self.keys)) if i not in unreadable]
        renumbered = {old: new for new, old in enumerate(kept)}
        for index, why in unreadable.items():
            self.skipped[self.paths[index]] = why
            self.dropped_captions += len(self.refs.pop(self.keys[index]))
        self.samples = [(renumbered[i], ids) for i, ids in self.samples if i in renumbered]
        self.keys = [self.keys[i] for i in kept]
        self.paths = [self.paths[i] for i in kept]
        return kept

    def fingerprint(self) -> dict:
        """What a resumed run must find unchanged: the counts, and a hash of every key and caption."""
        digest = hashlib.sha1(json.dumps([self.keys, self.samples]).encode()).hexdigest()
        return {"images": len(self.keys), "captions": len(self.samples), "sha1": digest}


def read_image(path: str):
    """(RGB image, "") as inference reads it (image_io.open_rgb), or (None, why) when it does not decode:
    corrupt, truncated, too large; Pillow raises more than OSError, so every failure counts."""
    try:
        return open_rgb(path), ""
    except Exception as error:  # noqa: BLE001
        return None, f"{type(error).__name__}: {error}"


class UnreadableImage(InputError):
    """An image that cannot be read any more. A DataLoader worker's exception comes back as its type
    built from a text holding the worker's traceback; only the original message is kept."""

    def __init__(self, message: str):
        marker = type(self).__name__ + ": "
        if "Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class ImageFiles(Dataset):
    """Preprocessed images. All were readable when the run started (prepare_images); one that no
    longer is raises UnreadableImage naming it."""

    def __init__(self, paths: list, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image, why = read_image(self.paths[index])
        if image is None:
            raise UnreadableImage(f"cannot read image {self.paths[index]!r} ({why}), which was readable when "
                                  "the run started")
        return self.transform(image)


class CheckedImages(Dataset):
    """(index, preprocessed image, or None without a transform) per path, or (index, why) for one that
    does not decode as inference decodes it (image_io.open_rgb): never an exception, in any worker."""

    def __init__(self, paths: list, transform=None):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image, why = read_image(self.paths[index])
        if image is None:
            return index, why
        return index, (self.transform(image) if self.transform else None)


def collate_checked(items):
    """CheckedImages items -> (indices read, their images stacked [B, 3, H, W] or None, {index: why})"""
    read = [(i, x) for i, x in items if not isinstance(x, str)]
    failed = {i: x for i, x in items if isinstance(x, str)}
    images = torch.stack([x for _, x in read]) if read and read[0][1] is not None else None
    return [i for i, _ in read], images, failed


def unreadable_images(paths: list, workers: int = 0, desc: str = "checking images") -> dict:
    """index -> why for each of `paths` that does not decode: one full pass (a progress bar on stderr)."""
    loader = DataLoader(CheckedImages(paths), batch_size=32, num_workers=workers, collate_fn=collate_checked)
    unreadable = {}
    with tqdm(total=len(paths), desc=desc, unit="img", file=sys.stderr) as bar:
        for read, _, failed in loader:
            unreadable.update(failed)
            bar.update(len(read) + len(failed))
    return unreadable


CONTENT_BLOCK = 64 * 1024


def content_digest(path: str) -> str:
    """A hash of the file's first and last 64 KiB: an image replaced by another of the same size and
    time changes it (JPEG headers and entropy-coded data differ), for two small reads per file."""
    size = os.path.getsize(path)
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        digest.update(f.read(CONTENT_BLOCK))
        if size > CONTENT_BLOCK:
            f.seek(max(size - CONTENT_BLOCK, CONTENT_BLOCK))
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _file_list(paths: list) -> list:
    return [[os.path.basename(p), os.path.getsize(p), int(os.path.getmtime(p)), content_digest(p)] for p in paths]


def _read_index(path: str):
    """The cache index at `path`, or None (with a warning naming it when it exists but is damaged)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as error:  # a cut-off write, a bad encoding, a folder
        warn(f"feature cache index {path} is damaged ({error}); rebuilding the cache")
        return None
    if not (isinstance(index, dict) and isinstance(index.get("files"), list)
            and isinstance(index.get("unreadable"), dict)):
        warn(f"feature cache index {path} is not an index this program wrote; rebuilding the cache")
        return None
    return index


def _open_array(path: str, rows: int):
    """The cached features at `path` memory-mapped, or None (with a warning naming the file) when the
    file is missing, damaged or not `rows` images' fp16 tokens."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as error:  # missing, truncated ("mmap length is greater ..."), not .npy
        warn(f"feature cache {path} cannot be read ({error}); rebuilding it")
        return None
    if array.ndim != 3 or array.shape[0] != rows or array.dtype != np.float16:
        warn(f"feature cache {path} holds {array.dtype} {tuple(array.shape)}, expected {rows} images' fp16 "
             "tokens [N, S, W]; rebuilding it")
        return None
    return array


class FeatureCache(Dataset):
    """The frozen encoder's tokens for every image of a split, fp16 in one .npy on disk.

    The ViT runs once per image; later epochs read rows from a memory map.
    The folder is keyed by everything that determines the features (encoder
    name and options, weights file, preprocessing), and the split's file
    list (names, sizes, times, a hash of each file's first and last 64 KiB)
    must match, so a stale cache is never read. The index is written last: an
    interrupted build is simply rebuilt, and so is a damaged index or array
    (with a warning naming it). Building reads every image: `unreadable`
    (index -> why) lists those that do not decode; their rows hold zeros.
    """

    def __init__(self, folder: str, encoder, split: Split, device, batch_size: int = 64, workers: int = 0):
        key = hashlib.sha1(json.dumps(encoder.describe(), sort_keys=True).encode()).hexdigest()[:16]
        self.folder = os.path.join(folder, key)
        array_path = os.path.join(self.folder, split.name + ".npy")
        index_path = os.path.join(self.folder, split.name + ".json")
        files = _file_list(split.paths)
        index = _read_index(index_path)
        self.array = None
        if index is not None and index["files"] == files:
            self.array = _open_array(array_path, len(files))  # [N, S, W] fp16
        if self.array is None:
            unreadable = self._build(encoder, split, array_path, device, batch_size, workers)
            index = {"files": files, "unreadable": {str(i): why for i, why in sorted(unreadable.items())}}
            atomic_write_text(os.path.join(self.folder, "encoder.json"), json.dumps(encoder.describe(), indent=1))
            atomic_write_text(index_path, json.dumps(index))
            self.array = np.load(array_path, mmap_mode="r")
        self.unreadable = {int(i): why for i, why in index["unreadable"].items()}

    @staticmethod
    @torch.no_grad()
    def _build(encoder, split, array_path, device, batch_size, workers) -> dict:
        loader = DataLoader(CheckedImages(split.paths, encoder.transform), batch_size=batch_size,
                            num_workers=workers, collate_fn=collate_checked)
        array, unreadable = None, {}
        encoder = encoder.to(device).eval()
        with atomic_output(array_path) as tmp:
            for indices, images, failed in tqdm(loader, desc=f"caching {split.name} features", unit="batch",
                                                file=sys.stderr):
                unreadable.update(failed)
                if images is None:
                    continue
                with autocast(device):
                    feats = encoder(images.to(device)).half().cpu().numpy()  # [B, S, W]
                if array is None:  # zeros: the rows of unreadable images stay so
                    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                                      shape=(len(split.paths),) + feats.shape[1:])
                array[indices] = feats
            if array is None:
                raise InputError(f"none of the {len(split.paths)} images in {split.images_dir!r} can be read, "
                                 f"e.g. {split.paths[0]!r}: {unreadable.get(0)}")
            array.flush()
            del array
        return unreadable

    def __len__(self):
        return len(self.array)

    def __getitem__(self, index):
        return torch.from_numpy(np.array(self.array[index]))


def skip_unreadable(split: Split, unreadable: dict, strict: bool) -> list:
    """Leave the unreadable images out of `split`, each named in a warning, their captions counted
    (`strict`: an InputError instead); -> the indices kept, in the old numbering."""
    if not unreadable:
        return list(range(len(split.keys)))
    named = [f"{split.paths[i]!r} ({unreadable[i]})" for i in sorted(unreadable)]
    if len(unreadable) == len(split.paths):
        raise InputError(f"none of the {len(split.paths)} images in {split.images_dir!r} can be read, "
                         f"e.g. {named[0]}")
    if strict:
        raise InputError(f"{len(unreadable)} of the {len(split.paths)} images in {split.images_dir!r} cannot be "
                         f"read (--strict-data): {'; '.join(named[:3])}" + ("; ..." if len(named) > 3 else ""))
    for text in named:
        warn(f"skipping {split.name} image {text}")
    kept = split.drop_images(unreadable)
    warn(f"{split.annotations}: the {len(unreadable)} unreadable image(s) and their {split.dropped_captions} "
         f"caption(s) are left out (of {len(kept) + len(unreadable)} images)")
    return kept


def split_overlap(train: Split, val: Split) -> str | None:
    """A warning when validation images are also training images: byte copies (same size and
    content_digest) or the same key with the same captions. Validation CIDEr would then measure recall."""
    by_size = {}
    for path in train.paths:
        by_size.setdefault(os.path.getsize(path), []).append(path)
    train_refs = {k: sorted(v) for k, v in train.refs.items()}
    digests = {}  # only files whose size some file of the other split shares are read

    def digest(path):
        if path not in digests:
            digests[path] = content_digest(path)
        return digests[path]

    shared = []
    for key, path in zip(val.keys, val.paths):
        copies = by_size.get(os.path.getsize(path), [])
        if train_refs.get(key) == sorted(val.refs[key]) or (copies and digest(path) in {digest(p) for p in copies}):
            shared.append(path)
    if not shared:
        return None
    return (f"{len(shared)} of the {len(val.keys)} validation images ({val.annotations}, {val.images_dir}) are also "
            f"in the training split ({train.annotations}, {train.images_dir}) as identical files or the same name "
            f"with the same captions, e.g. {shared[0]!r}: validation CIDEr will measure recall of the training "
            "captions, not captioning")


def prepare_images(train: Split, val: Split, encoder, cache_folder: str | None, device, batch_size: int,
                   workers: int, strict: bool) -> tuple:
    """What the run reads per image of each split, after every image was read once: cached features
    (FeatureCache, which reads them all while caching) or preprocessed images (ImageFiles, after a check
    pass). Unreadable images are left out of the splits (skip_unreadable); the splits are compared
    (split_overlap). -> (train source, val source), indexed as the splits' keys now are."""
    message = split_overlap(train, val)
    if message:
        warn(message)
    sources = []
    for split in (train, val):
        if cache_folder:
            cache = FeatureCache(cache_folder, encoder, split, device, batch_size, workers)
            sources.append(Subset(cache, skip_unreadable(split, cache.unreadable, strict)))
        else:
            unreadable = unreadable_images(split.paths, workers, f"checking {split.name} images")
            skip_unreadable(split, unreadable, strict)
            sources.append(ImageFiles(split.paths, encoder.transform))
    if not train.samples:
        raise InputError(f"{train.annotations}: no caption with text is left for a readable image; "
                         "nothing to train on")
    return tuple(sources)


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
