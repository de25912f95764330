"""Reading image folders and writing outputs safely; shared by every entry point.

The graders' scripts get absolute paths to folders whose files may carry any
name, extension or image mode, so the rules live here once:

- every regular file is offered to Pillow; what it cannot identify is skipped
  with a warning naming the file, and so is an image that fails to decode;
- every image becomes 8-bit RGB, whatever its mode (L, LA, P, RGBA, CMYK,
  16-bit grayscale);
- outputs are written to a temporary file next to the target and renamed
  over it, so a crash never leaves a half-written file behind.
"""
from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))


def cache_dir(*parts: str) -> str:
    """Folder for downloaded weights: $HW3_CACHE, else `cache/` in the repository."""
    root = os.environ.get("HW3_CACHE") or os.path.join(REPO_ROOT, "cache")
    return os.path.join(root, *parts)


def warn(message: str) -> None:
    print("warning: " + message, file=sys.stderr)


def list_files(folder: str) -> list[str]:
    """Sorted names of the regular files in `folder` (no recursion).

    Exits with a message when the folder is missing or holds no file at all.
    """
    if not os.path.isdir(folder):
        raise SystemExit(f"error: image folder {folder!r} does not exist or is not a folder")
    names = sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)))
    if not names:
        raise SystemExit(f"error: image folder {folder!r} contains no files")
    return names


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB.

    16-bit and float grayscale are rescaled rather than clipped (Pillow's own
    convert clips them to white); transparency is composited over white
    rather than dropped (which would expose whatever colour hides under it).
    """
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        pixels = np.asarray(image, dtype=np.float32)
        if pixels.size and pixels.max() > 255:
            pixels = pixels / 257.0
        image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def is_image(path: str) -> bool:
    """Whether Pillow can identify `path` as an image (reads the header only)."""
    try:
        with Image.open(path):
            return True
    except Exception:  # noqa: BLE001 -- any failure means "not an image"
        return False


def open_rgb(path: str) -> Image.Image:
    """Decode the image at `path` fully and return it as RGB.

    Raises OSError (Pillow's UnidentifiedImageError included) when the file
    is not an image or is broken; callers decide what to do with it.
    """
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def image_error(path: str, error: Exception) -> str:
    """The warning for a file that could not be read as an image."""
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return f"skipping {os.path.basename(path)!r}: not an image Pillow can read"
    return f"skipping {os.path.basename(path)!r}: broken image ({error})"


class ReadableImages(Dataset):
    """Each file decoded once and passed through every transform.

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
    kept = [(i, x) for i, x in items if not isinstance(x, str)]
    skipped = [x for _, x in items if isinstance(x, str)]
    batches = [torch.stack(per_transform) for per_transform in zip(*(x for _, x in kept))]
    return [i for i, _ in kept], batches, skipped


def readable_batches(paths, transforms, batch_size: int, device, desc: str):
    """Yield (indices, batches) over the readable images of `paths`: `batches[t]` is
    transform t's [B, ...] tensor of the images `paths[i] for i in indices`.

    A file Pillow cannot read is skipped with a warning naming it; a tqdm bar
    on stderr counts files. Loading runs in worker processes on CUDA.
    """
    workers = min(4, os.cpu_count() or 1) if device.type == "cuda" else 0
    loader = DataLoader(ReadableImages(paths, transforms), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate_readable, pin_memory=device.type == "cuda")
    with tqdm(total=len(paths), unit="img", desc=desc, file=sys.stderr) as bar:
        for indices, batches, skipped in loader:
            for message in skipped:
                with tqdm.external_write_mode(file=sys.stderr):
                    warn(message)
            if indices:
                yield indices, batches
            bar.update(len(indices) + len(skipped))


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def env_number(name: str, cast, valid, allowed: str, default=None):
    """$name as cast(value), or `default` when unset; exits on a value that is not `allowed`."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = cast(value)
    except ValueError:
        number = None
    if number is None or not valid(number):
        raise SystemExit(f"error: {name}={value!r} is not {allowed}")
    return number


def strip_extension(name: str) -> str:
    """`photo.v2.JPEG` -> `photo.v2`: only the last extension goes."""
    stem, _ = os.path.splitext(name)
    return stem or name


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file and a rename.

    The parent folder is created; an existing file is replaced only once the
    new content is complete on disk.
    """
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise SystemExit(f"error: output path {path!r} is a folder, expected a file name")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path: str) -> None:
    """`torch.save` through a temporary file and a rename (see atomic_write_text)."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def torch_load(path: str):
    """`torch.load` onto the CPU, restricted to tensors and plain containers
    where this torch supports it (the argument is new in torch 1.13; the
    graders' 1.12.1 does not know it)."""
    import inspect

    if "weights_only" in inspect.signature(torch.load).parameters:  # guarded: torch >= 1.13
        return torch.load(path, map_location="cpu", weights_only=True)  # guarded
    return torch.load(path, map_location="cpu")
