"""The bottom layer every module shares: errors, paths, warnings, the environment, the device.

`InputError` is a problem with what the user gave (a path, an option, an
environment value), raised by library code; only the entry points turn it into
`error: <message>` and an exit code (`reports_input_errors`). The other jobs
have their own modules above this one: `image_io.py` (reading image folders),
`file_io.py` (the course's JSON files and atomic outputs), `weights.py`
(loading weights files safely and without wasted work).

It imports no other module of the repository. torch is imported where it is
used, so that the static tools (script_rules.py, `selfcheck.py --skip-run`)
can import this module cheaply.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
P2_CHECKPOINT_NAME = "p2_checkpoint.pt"


class InputError(ValueError):
    """A problem with the files, options or environment values given, reported to the user by name."""


def _writable_fd(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # not POSIX: no way to ask, assume it works
        return True
    try:
        return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY
    except OSError:  # closed
        return False


def ensure_stderr() -> None:
    """Give a process started with stderr closed (`2>&-`) a stderr that works: os.devnull.

    Python then sets sys.stderr to None (or, started through a wrapper script such as
    pyenv's shim, finds on descriptor 2 a file the wrapper opened for reading), and
    progress bars (tqdm) writing there fail the run. A free descriptor 2 would also
    be taken by the next file opened, which would then receive what C libraries print.
    Both point at os.devnull instead.
    """
    if sys.stderr is not None and _writable_fd(2):
        return
    fd = os.open(os.devnull, os.O_WRONLY)
    if fd != 2:
        os.dup2(fd, 2)
        os.close(fd)
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False)  # noqa: SIM115 (lives as long as the process)


def reports_input_errors(main):
    """Decorate an entry point's main: an InputError ends the program with `error: <message>`
    on stderr (exit status 1), with no traceback. A closed stderr is replaced first (`ensure_stderr`)."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        ensure_stderr()
        try:
            return main(*args, **kwargs)
        except InputError as error:
            raise SystemExit(f"error: {error}") from None
    return run


def cache_dir(*parts: str, repo: str = REPO_ROOT) -> str:
    """Folder for downloaded weights: $HW3_CACHE, else `cache/` in the repository `repo`. Only a
    write checks it (make_cache_folder): a run given every file it needs does not use the cache."""
    root = os.environ.get("HW3_CACHE") or os.path.join(repo, "cache")
    return os.path.join(root, *parts)


def make_cache_folder(path: str) -> None:
    """Create the folder of `path`, a file about to be downloaded into the cache; InputError naming
    the folder and $HW3_CACHE when it cannot be created or written to (read-only, no permission)."""
    folder = os.path.dirname(os.path.abspath(path))
    root = os.environ.get("HW3_CACHE")
    if root and os.path.lexists(root) and not os.path.isdir(root):
        raise InputError(f"HW3_CACHE={root!r} is not a folder; expected the folder for downloaded weights "
                         "(created when missing)")
    try:
        os.makedirs(folder, exist_ok=True)
        problem = None if os.access(folder, os.W_OK | os.X_OK) else "no permission to write in it"
    except OSError as error:
        problem = error.strerror or str(error)
    if problem:
        raise InputError(f"cannot write the cache folder {folder!r} ({problem}); set HW3_CACHE to a "
                         "writable folder")


def remove_empty_cache_folders(path: str) -> None:
    """After a failed download to `path`: remove its folder and the parents up to the cache root
    (included) while they are empty, so that nothing looks half-fetched."""
    root = os.path.abspath(cache_dir())
    folder = os.path.dirname(os.path.abspath(path))
    while folder == root or folder.startswith(root + os.sep):
        try:
            os.rmdir(folder)  # only an empty folder
        except OSError:
            return
        folder = os.path.dirname(folder)


def hub_offline() -> bool:
    """True when $HF_HUB_OFFLINE asks for no network (hw3_1.sh and hw3_2.sh set it): nothing is downloaded."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")


def p2_checkpoint(repo: str = REPO_ROOT) -> str:
    """The Problem 2 checkpoint hw3_2.sh reads: $HW3_P2_CKPT, else where hw3_download.sh puts it."""
    return os.environ.get("HW3_P2_CKPT") or cache_dir(P2_CHECKPOINT_NAME, repo=repo)


def existing_p2_checkpoint() -> str:
    """p2_checkpoint(), which must exist; the error says how to get one."""
    path = p2_checkpoint()
    if not os.path.isfile(path):
        raise InputError(f"no captioner checkpoint at {path!r}. Fetch the submitted one with "
                         "`bash hw3_download.sh`, or train one with `python3 p2_train.py ... --out FILE` "
                         "and set HW3_P2_CKPT=FILE")
    return path


def warn(message: str) -> None:
    print("warning: " + message, file=sys.stderr)


# Warnings that third-party packages print on every run and that say nothing about this
# repository's work, as (category, module raising it, message), all three matched:
KNOWN_NOISE = (
    # torch 2.x deprecates torch.jit; timm calls torch.jit.script on import, clip.load tries torch.jit.load
    (FutureWarning, r"torch\.jit(\.|$)", r"`torch\.jit\.\w+` is deprecated"),
    # openai/CLIP imports pkg_resources, which setuptools deprecates
    (UserWarning, r"clip(\.|$)", r"pkg_resources is deprecated"),
)


def quiet_known_warnings() -> None:
    """Hide KNOWN_NOISE; every entry point calls this before it imports torch, timm or clip.
    Any other warning, ours included, still shows."""
    import warnings

    for category, module, message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def is_utf8(name: str) -> bool:
    """Whether a name from os.listdir is valid UTF-8 (undecodable bytes arrive as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def pick_device(requested="auto"):
    """The one device choice -> torch.device: "auto" is CUDA when torch sees a GPU, else
    the CPU; otherwise "cpu", "cuda" or "cuda:N" as asked (a torch.device is accepted too).

    Raises InputError for another name, or for CUDA that this machine does not have.
    """
    import torch

    requested = str(requested)
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InputError(f"unknown device {requested!r}; expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {requested!r} was asked for but torch sees no CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InputError(f"device {requested!r} was asked for but torch sees only "
                         f"{torch.cuda.device_count()} CUDA device(s)")
    return device


def loader_workers(device) -> int:
    """Data-loading processes for work on `device` (a torch.device): beside a GPU every core but
    the one that drives it, up to 12 (decoding and resizing images is what keeps a GPU waiting);
    none on the CPU, where the workers would only compete with the model for the cores."""
    return max(1, min(12, (os.cpu_count() or 1) - 1)) if device.type == "cuda" else 0


class PhaseTimer:
    """Wall time per phase of a run (p1_zeroshot's and p2_inference's profiles). With `sync` on CUDA
    each phase ends with a synchronisation, so that its GPU work is counted in it and not in the next
    (a profile); without, phases overlap. `seconds`: phase -> seconds, summed over its entries."""

    def __init__(self, device, sync: bool):
        import torch

        self.device = device
        self.sync = torch.cuda.synchronize if sync and device.type == "cuda" else (lambda: None)
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def profile(self, **extra) -> str:
        """The profile as JSON text: {"seconds": {phase: seconds}, **extra}, and on CUDA the peak
        memory allocated ("peak_allocated_mb")."""
        import json

        import torch

        profile = {"seconds": {k: round(v, 3) for k, v in self.seconds.items()}, **extra}
        if self.device.type == "cuda":
            profile["peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20)
        return json.dumps(profile, indent=2) + "\n"


def free_cuda_memory(device) -> int:
    """Bytes free on CUDA `device` now: what the driver reports, plus what torch's allocator holds
    in reserve and could hand out again."""
    import torch

    if hasattr(torch.cuda, "mem_get_info"):  # guarded
        free = torch.cuda.mem_get_info(device)[0]  # guarded: torch >= 1.11
    else:  # older torch: total less what torch has reserved (blind to other processes)
        free = torch.cuda.get_device_properties(device).total_memory - torch.cuda.memory_reserved(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


class Range:
    """The values a numeric option takes: the parser's `type=` (a bad value gets argparse's one-line
    `error: argument --lr: ...` at parse time), the text --help shows (`str(range)`), and the check
    p2_train.py's --resume applies to a saved run's settings. NaN and infinities are never in a
    range, nor an integer past sys.maxsize (Python's ranges and slices, and torch's sizes, take none).
    `off`: a word (and 0) meaning "off", parsed as None. env_number reads environment values with it."""

    def __init__(self, kind, low=None, high=None, low_open=False, high_open=False, off=None):
        self.kind, self.low, self.high, self.low_open, self.high_open, self.off = \
            kind, low, high, low_open, high_open, off
        self.__name__ = str(self)  # argparse names the type in some of its messages

    def __str__(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        low, high = (f"{v:g}" if isinstance(v, float) else str(v) for v in (self.low, self.high))
        if self.low is not None and self.high is not None:
            text = f"{what} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{what} {'>' if self.low_open else '>='} {low}"
        else:
            text = what
        return text + (f", or 0 / {self.off} for off" if self.off else "")

    def holds(self, value) -> bool:
        if value is None:
            return self.off is not None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(value, int) and abs(value) > sys.maxsize:
            return False
        # a float, never an int: float() of an int past 1e308 raises OverflowError
        if isinstance(value, float) and (not math.isfinite(value) or (self.kind is int and not value.is_integer())):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value < self.high or (value == self.high and not self.high_open)

    def parse(self, text: str):
        """`text` as a value of the range; ValueError saying what was expected."""
        if self.off and text.strip().lower() in (self.off, "0", "0.0"):
            return None
        try:
            value = self.kind(text)
        except ValueError:
            value = None
        if value is None or not self.holds(value):
            too_big = isinstance(value, int) and abs(value) > sys.maxsize and self.high is None
            raise ValueError(f"{self}" + (f", at most {sys.maxsize}" if too_big else ""))
        return value

    def __call__(self, text: str):
        try:
            return self.parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"expected {error}, got {text!r}") from None


# --workers (p2_train, p2_evaluate): data-loading processes. Past 64 a count is a typo, not a setting
# (`--workers 4000` would fork until the machine refuses); loader_workers never picks more than 12.
WORKERS = Range(int, 0, 64)


def env_number(name: str, allowed: Range, default=None):
    """$name as a value of the Range `allowed`, or `default` when unset or empty; InputError naming
    the variable, its value and the range for any other value (nan, inf, -1, 1e30, 'abc', ...)."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return allowed.parse(value)
    except ValueError as error:
        raise InputError(f"{name}={value!r} is not {error}") from None


def strip_extension(name: str) -> str:
    """`photo.v2.JPEG` -> `photo.v2`: only the last extension goes."""
    stem, _ = os.path.splitext(name)
    return stem or name
