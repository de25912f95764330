"""Reading image folders: any name, extension or image mode, one bad file never ends a run.

The graders' scripts get absolute paths to folders whose files may carry any
name, extension or image mode, so the rules live here once:

- every regular file is offered to Pillow; what it cannot identify is skipped
  with a warning naming the file, and so is an image that fails to decode;
- a file whose name is not valid UTF-8 is skipped with a warning naming its
  bytes: the outputs are UTF-8 CSV and JSON, which cannot hold that name, and
  one unencodable row would make the graders' reader reject the whole file
  (pandas and json read UTF-8 strictly); a symbolic link that leads nowhere is
  skipped with a warning too;
- every image becomes 8-bit RGB, whatever its mode (L, LA, P, RGBA, CMYK,
  16-bit grayscale);
- the work an image costs is bounded by what the models see (`open_rgb`): a
  strip is cropped to its centre, a huge image shrunk, an image above Pillow's
  decompression-bomb limit decoded at a reduced scale (JPEG) or skipped with a
  warning saying its size and the limit; ordinary images are read unchanged.
"""
from __future__ import annotations

import math
import os
import sys
import warnings

import numpy as np
from PIL import Image
from tqdm import tqdm

from io_utils import InputError, is_utf8, loader_workers, strip_extension, warn

def list_files(folder: str) -> list[str]:
    """Sorted names of the regular files in `folder` (no recursion).

    A name that is not valid UTF-8 and a symbolic link that leads nowhere are
    skipped with a warning (see the module docstring). Raises InputError
    when the folder is missing or holds no file at all.
    """
    if not os.path.isdir(folder):
        raise InputError(f"image folder {folder!r} does not exist or is not a folder")
    names = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.islink(path) and not os.path.exists(path):
            warn(f"skipping {name!r}: a symbolic link to {os.readlink(path)!r}, which does not exist")
        elif not os.path.isfile(path):
            continue
        elif not is_utf8(name):
            warn(f"skipping {os.fsencode(name)!r}: its name is not valid UTF-8, so no UTF-8 output can "
                 "name it; rename the file")
        else:
            names.append(name)
    if not names:
        raise InputError(f"image folder {folder!r} contains no files")
    return names


# Grayscale modes Pillow gives 16-bit data, and the value of white in each. Pillow 9.2 (the
# graders') opens 16-bit PNG and PGM as "I", newer releases as "I;16"; either way the format's
# range is 0..65535, so a 32-bit "I" image above it clips to white. "F" has no format range:
# it is read on Pillow's own 0..255 scale (its convert("L") clips there too).
GRAY_WHITE = {"I": 65535.0, "I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "F": 255.0}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB.

    16-bit grayscale is scaled by its format's range (65535 -> 255), whatever
    the image holds, rather than clipped (Pillow's own convert clips it to
    white); transparency is composited over white rather than dropped (which
    would expose whatever colour hides under it).
    """
    if image.mode in GRAY_WHITE:
        pixels = np.asarray(image, dtype=np.float32) * (255.0 / GRAY_WHITE[image.mode])
        image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def is_image(path: str) -> bool:
    """Whether `path` decodes fully as an image (open_rgb): exactly the files the
    entry points caption or classify, so a truncated file whose header Pillow
    reads is not one."""
    try:
        open_rgb(path)
    except Exception:  # noqa: BLE001 -- any failure means "not an image", as in ReadableImages
        return False
    return True


# The work an image costs is bounded by what the models see, not by its size on disk. Both models'
# transforms resize the short side to their input size and then take the centre square, so
# - a strip is cropped to its centre, at most MAX_ASPECT times as long as it is wide: resizing a
#   1 x 20000 strip's short side to 248 would otherwise make a 248 x 4,960,000 image (5.9 GB);
# - an image whose short side exceeds 2 x SAFE_SIDE is shrunk by a whole factor (JPEG: decoded
#   at 1/2, 1/4 or 1/8 scale, `draft`) to a short side of at least SAFE_SIDE, far above any
#   model input (224..336). Images within both bounds (every photo of the course's sets) are
#   read exactly as before, pixel for pixel.
MAX_ASPECT = 8
SAFE_SIDE = 1024


class ImageTooLarge(ValueError):
    """An image above Pillow's decompression-bomb limit that cannot be decoded at a reduced scale."""


def _open_unguarded(path: str) -> Image.Image:
    """Image.open without Pillow's refusal of images above its pixel limit; the caller decides
    (open_rgb decodes such an image only at a scale that brings it under the limit)."""
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # decided by _decode_within_limits
        try:
            return Image.open(path)
        except Image.DecompressionBombError:
            Image.MAX_IMAGE_PIXELS = None
            try:
                return Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = limit


def _decode_within_limits(image: Image.Image) -> None:
    """Decode `image` (just opened), JPEG at the coarsest scale that keeps its short side at least
    SAFE_SIDE when it is larger than 2 x SAFE_SIDE or above Pillow's limit; ImageTooLarge when the
    decoded image would still exceed the limit Pillow refuses at (twice MAX_IMAGE_PIXELS)."""
    width, height = image.size
    limit = Image.MAX_IMAGE_PIXELS
    refused_above = 2 * limit if limit else None
    if min(width, height) > 2 * SAFE_SIDE or (refused_above and width * height > refused_above):
        # JPEG decodes at 1/1, 1/2, 1/4 or 1/8 scale: the largest that keeps the short side at least
        # SAFE_SIDE, or the smallest that brings the image under the limit when that is larger
        scale = 2 ** int(math.log2(max(1, min(width, height) // SAFE_SIDE)))
        if refused_above and width * height > refused_above:
            scale = max(scale, 2 ** math.ceil(math.log2(math.sqrt(width * height / refused_above))))
        # draft takes the largest scale s with size // asked >= s: ask for the floor of each side
        image.draft(None, (max(1, width // scale), max(1, height // scale)))
    if refused_above and image.size[0] * image.size[1] > refused_above:
        raise ImageTooLarge(f"too large: {width * height} pixels ({width} x {height}), Pillow's limit is "
                            f"{refused_above} (its decompression-bomb guard, Image.MAX_IMAGE_PIXELS = {limit}); "
                            "only JPEG can be read at a reduced scale")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # within the limit: decoded on purpose
        image.load()


def bounded(image: Image.Image) -> Image.Image:
    """`image` cropped to its centre when it is longer than MAX_ASPECT times its width (either way), and
    shrunk by a whole factor when its short side exceeds 2 x SAFE_SIDE; the image itself otherwise."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if long > MAX_ASPECT * short:
        keep = MAX_ASPECT * short
        start = (long - keep) // 2
        box = (start, 0, start + keep, height) if width > height else (0, start, width, start + keep)
        image = image.crop(box)
    if short > 2 * SAFE_SIDE:
        image = image.reduce(short // SAFE_SIDE)
    return image


def open_rgb(path: str) -> Image.Image:
    """Decode the image at `path` fully and return it as RGB, bounded in size (`bounded`, MAX_ASPECT,
    SAFE_SIDE): an ordinary image exactly as it is, a strip or a huge image at a size that costs
    no more than the models need.

    An image above Pillow's decompression-bomb limit is decoded at a reduced scale where the
    format allows it (JPEG), so it is captioned or classified like any other; otherwise it raises
    ImageTooLarge saying its size and the limit. Raises OSError (Pillow's UnidentifiedImageError
    included) when the file is not an image or is broken; callers decide what to do with it.
    """
    with _open_unguarded(path) as image:
        _decode_within_limits(image)
        return bounded(to_rgb(image))


def image_error(path: str, error: Exception) -> str:
    """The warning for a file that could not be read as an image."""
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return f"skipping {os.path.basename(path)!r}: not an image Pillow can read"
    if isinstance(error, ImageTooLarge):
        return f"skipping {os.path.basename(path)!r}: {error}"
    return f"skipping {os.path.basename(path)!r}: broken image ({error})"


class ReadableImages:
    """Each file decoded once and passed through every transform (a map-style torch dataset).

    An item is (index, tuple of tensors, one per transform), or (index,
    warning text) when the file is not a readable image; `_collate_readable`
    separates the two so that loading stays a single pass.
    """

    def __init__(self, paths, transforms):
        self.paths = list(paths)
        self.transforms = list(transforms)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        try:
            image = open_rgb(path)
        # Pillow's plugins raise more than OSError on corrupt data (ValueError,
        # struct.error, DecompressionBombError...); one bad file must not end the run.
        except Exception as error:  # noqa: BLE001
            return index, image_error(path, error)
        return index, tuple(transform(image) for transform in self.transforms)


def _collate_readable(items):
    """-> (kept indices, per transform a stacked batch, warnings of skipped files)"""
    import torch

    kept = [(i, x) for i, x in items if not isinstance(x, str)]
    skipped = [x for _, x in items if isinstance(x, str)]
    batches = [torch.stack(per_transform) for per_transform in zip(*(x for _, x in kept))]
    return [i for i, _ in kept], batches, skipped


def readable_batches(paths, transforms, batch_size: int, device, desc: str, pin_memory: bool | None = None):
    """Yield (indices, batches) over the readable images of `paths`: `batches[t]` is
    transform t's [B, ...] tensor of the images `paths[i] for i in indices`.

    A file Pillow cannot read is skipped with a warning naming it; a tqdm bar
    on stderr counts files. Loading runs in worker processes on CUDA, into pinned
    memory unless `pin_memory` is False (pinning runs in a thread of its own, which
    must not make CUDA calls while a CUDA graph is being captured).
    """
    from torch.utils.data import DataLoader

    loader = DataLoader(ReadableImages(paths, transforms), batch_size=batch_size,
                        num_workers=loader_workers(device), collate_fn=_collate_readable,
                        pin_memory=device.type == "cuda" if pin_memory is None else pin_memory)
    with tqdm(total=len(paths), unit="img", desc=desc, file=sys.stderr) as bar:
        for indices, batches, skipped in loader:
            for message in skipped:
                with tqdm.external_write_mode(file=sys.stderr):
                    warn(message)
            if indices:
                yield indices, batches
            bar.update(len(indices) + len(skipped))


def find_images(images_root: str, keys) -> dict[str, str]:
    """Path of the image of each key: `<root>/<key>.<any extension>`.

    `<key>.jpg` (the course's path) wins when several files share the stem.
    Raises InputError naming the keys without an image.
    """
    if not os.path.isdir(images_root):
        raise InputError(f"image folder {images_root!r} does not exist or is not a folder")
    by_stem = {}
    for name in sorted(os.listdir(images_root)):
        if os.path.isfile(os.path.join(images_root, name)):
            by_stem.setdefault(strip_extension(name), []).append(name)
    paths, missing = {}, []
    for key in keys:
        names = by_stem.get(key)
        if not names:
            missing.append(key)
            continue
        name = key + ".jpg" if key + ".jpg" in names else names[0]
        paths[key] = os.path.join(images_root, name)
    if missing:
        missing.sort()
        raise InputError(f"no image in {images_root!r} for {len(missing)} key(s), "
                         f"e.g. {missing[0]!r} (looked for {missing[0]}.*); all: {missing[:5]}")
    return paths
