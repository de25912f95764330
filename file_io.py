"""The course's JSON files in, outputs out: read with clear errors, written atomically.

Outputs are written to a temporary file next to the target and renamed over
it (`atomic_output`), so a crash never leaves a half-written file behind, and
they get the mode a plain open() would give them.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import stat
import tempfile
from collections import Counter

from io_utils import InputError, is_utf8, strip_extension

def check_output_path(path: str) -> None:
    """Raise InputError unless a file can be written at `path`; entry points call it before any work.

    `path` must name a file (not a folder, no trailing separator, which would
    otherwise write a file named after the folder), and the nearest folder on
    its way that exists must take a new file: it is tried, since permission
    bits say nothing to root or on a read-only file system. Creates nothing.
    """
    if not path:
        raise InputError("the output path is empty; expected a file name")
    if path.endswith(os.sep) or (os.altsep and path.endswith(os.altsep)) or os.path.isdir(path):
        raise InputError(f"output path {path!r} is a folder; expected a file name")
    existing = os.path.dirname(os.path.abspath(path))
    longest = name_max(existing if os.path.isdir(existing) else ".")
    if len(os.fsencode(os.path.basename(path))) > longest:
        raise InputError(f"output name {os.path.basename(path)!r} is {len(os.fsencode(os.path.basename(path)))} "
                         f"bytes long; the file system takes at most {longest}")
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InputError(f"cannot write {path!r}: {existing!r} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise InputError(f"cannot write {path!r}: cannot create a file in {existing!r} "
                         f"({error.strerror or error})") from None


def check_input_file(path: str, what: str) -> None:
    """Raise InputError naming `what` unless `path` is an existing file (not a folder)."""
    if os.path.isdir(path):
        raise InputError(f"{what} {path!r} is a folder; expected a file")
    if not os.path.exists(path):
        raise InputError(f"{what} {path!r} does not exist")


def read_text(path: str, what: str) -> str:
    """The UTF-8 text in `path`; InputError naming `what` and the path when it is missing, a
    folder, unreadable or not UTF-8 text."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise InputError(f"{what} {path!r} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path!r} is a folder; expected a file") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path!r} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise InputError(f"cannot read {what} {path!r}: {e.strerror or e}") from None


# No file this repository reads nests deeper than a few levels; deeper data would make Python's
# own recursion (repr in an error message, a copy) fail later, so it is refused on reading.
MAX_JSON_DEPTH = 100
TOO_DEEP = f"is nested too deeply: more than {MAX_JSON_DEPTH} levels of arrays or objects within each other"
# A \u escape of a UTF-16 surrogate (\ud800-\udfff): "\ud83d\ude00" is one character, "\ud800" alone none.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _may_hold_lone_surrogate(text: str) -> bool:
    """Whether JSON `text` has a surrogate escape without its partner: a high one (d800-dbff) not
    directly followed by a low one (dc00-dfff), or a low one not directly after a high one. An
    escaped backslash before "u" can look like one too: a True only says to look at the strings."""
    pending = None  # where the low half of the last high surrogate must start
    for match in _SURROGATE_ESCAPE.finditer(text):
        if match.group()[3] in "cdefCDEF":  # a low surrogate
            if pending != match.start():
                return True
            pending = None
        elif pending is not None:  # a high one after a high one still waiting
            return True
        else:
            pending = match.end()
    return pending is not None


_SURROGATE_HINT = (" (an escape \\ud800-\\udfff without its pair: no character, and not writable as UTF-8); "
                   "expected text")


def _nests_deeper_than(data, limit: int) -> bool:
    """Whether parsed JSON `data` holds arrays or objects more than `limit` levels deep (level by level)."""
    level = [data] if isinstance(data, (dict, list)) else []
    for _ in range(limit):
        level = [item for value in level for item in (value.values() if isinstance(value, dict) else value)
                 if isinstance(item, (dict, list))]
        if not level:
            return False
    return True


def _lone_surrogate(data) -> str:
    """Where parsed JSON `data` holds a string (or key) with a lone surrogate, as the end of a message
    naming its location (`["annotations"][3]["caption"]`); "" if nowhere."""
    stack = [(data, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, (dict, list)):
            for key, item in value.items() if isinstance(value, dict) else enumerate(value):
                if isinstance(key, str) and not is_utf8(key):
                    return f"in the key {where}[{ascii(key)[:60]}]"
                stack.append((item, f"{where}[{json.dumps(key)[:60]}]"))
        elif isinstance(value, str) and not is_utf8(value):
            return f"in the string at {where or 'the top level'}"
    return ""


def read_json(path: str, what: str, object_pairs_hook=None):
    """The JSON in `path`; InputError naming `what` and the path when it is missing, a folder,
    not UTF-8 text, not JSON, nested more than MAX_JSON_DEPTH levels deep, or holds a string
    with a lone surrogate (`"\\ud800"`: it names no character and no output could hold it).
    `object_pairs_hook` as in `json.load`; an InputError it raises passes through."""
    text = read_text(path, what)
    try:
        data = json.loads(text, object_pairs_hook=object_pairs_hook)
    except InputError:
        raise
    except RecursionError:
        raise InputError(f"{what} {path!r} {TOO_DEEP}") from None
    except ValueError as e:
        raise InputError(f"{what} {path!r} is not valid JSON: {e}") from None
    # each walk only when the text could hold what it looks for
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _nests_deeper_than(data, MAX_JSON_DEPTH):
        raise InputError(f"{what} {path!r} {TOO_DEEP}")
    where = _lone_surrogate(data) if _may_hold_lone_surrogate(text) else ""
    if where:
        raise InputError(f"{what} {path!r} holds a lone UTF-16 surrogate {where}{_SURROGATE_HINT}")
    return data


def load_references(annotation_file: str) -> dict[str, list[str]]:
    """Reference captions per image key from a course (COCO-style) annotation file.

    The key of an image is its `file_name` without the last extension; its
    captions are the `annotations` whose `image_id` is its `id`. Raises
    InputError naming the problem when the structure is not that.
    """
    data = read_json(annotation_file, "annotation file")
    where = f"annotation file {annotation_file!r}"
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a JSON object with 'images' and 'annotations', "
                         f"got {type(data).__name__}")
    for field in ("images", "annotations"):
        if field not in data:
            raise InputError(f"{where}: missing the {field!r} list")
        if not isinstance(data[field], list):
            raise InputError(f"{where}: {field!r} must be a list, got {type(data[field]).__name__}")
    if not data["images"]:
        raise InputError(f"{where}: 'images' is empty")

    key_of_id = {}
    for i, image in enumerate(data["images"]):
        if (not isinstance(image, dict) or not isinstance(image.get("file_name"), str)
                or not isinstance(image.get("id"), (int, str))):
            raise InputError(f"{where}: images[{i}] must be an object with a string 'file_name' "
                             f"and an integer or string 'id', got {image!r}")
        if image["id"] in key_of_id:
            raise InputError(f"{where}: image id {image['id']!r} appears twice in 'images'")
        key_of_id[image["id"]] = strip_extension(image["file_name"])
    shared = sorted(k for k, n in Counter(key_of_id.values()).items() if n > 1)
    if shared:
        raise InputError(f"{where}: {len(shared)} name(s) without extension belong to several images, "
                         f"e.g. {shared[:5]}")

    refs = {key: [] for key in key_of_id.values()}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise InputError(f"{where}: annotations[{i}] must be an object with 'image_id' "
                             f"and a string 'caption', got {ann!r}")
        try:
            key = key_of_id[ann["image_id"]]
        except (KeyError, TypeError):
            raise InputError(f"{where}: annotations[{i}] refers to image_id {ann['image_id']!r}, "
                             "which is not in 'images'") from None
        refs[key].append(ann["caption"])
    empty = sorted(k for k, captions in refs.items() if not captions)
    if empty:
        raise InputError(f"{where}: {len(empty)} image(s) have no caption, e.g. {empty[:5]}")
    return refs


TMP_SUFFIX = ".tmp"
# tempfile.mkstemp's random part: 8 characters of this set (Python 3.8 to 3.13)
_TMP_PATTERN = re.compile(r"\.(?P<stem>.+)\.(?P<pid>[1-9][0-9]{0,9})\.[a-z0-9_]{8}" + re.escape(TMP_SUFFIX))
_PID_WIDTH = 10  # digits kept free for the pid in a temporary's name (Linux's pid_max is 4194304)
_RANDOM_WIDTH = 8
# Space a temporary's name takes besides its stem: "." stem "." pid "." random ".tmp"
_TMP_OVERHEAD = 3 + _PID_WIDTH + _RANDOM_WIDTH + len(TMP_SUFFIX)


def name_max(folder: str) -> int:
    """The longest file name (in bytes) the file system of `folder` takes; 255 when it does not say."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _tmp_stem(path: str) -> str:
    """The output's name as its temporaries carry it: the name itself, or, when a temporary's name would
    then exceed the file system's NAME_MAX, its start cut at a character and a hash of the whole name
    (so that two long names sharing a start still have their own temporaries)."""
    name = os.path.basename(path)
    room = name_max(os.path.dirname(path) or ".") - _TMP_OVERHEAD
    if len(os.fsencode(name)) <= room:
        return name
    digest = "~" + hashlib.sha1(os.fsencode(name)).hexdigest()[:12]
    stem = name
    while stem and len(os.fsencode(stem + digest)) > room:
        stem = stem[:-1]
    return stem + digest


def _tmp_prefix(path: str, pid: int) -> str:
    """Temporary files for `path` are `.<stem>.<pid>.<random>.tmp` beside it (stem: `_tmp_stem`):
    hidden, and naming the process that writes them, so that a dead writer's leftovers can be found."""
    return f".{_tmp_stem(path)}.{pid}."


def process_exists(pid: int) -> bool:
    """Whether process `pid` is running (a pid no kernel gives, <= 0 or too large, never is)."""
    if pid <= 0:  # os.kill would signal a process group
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process is there
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists, and belongs to another user
        return True
    return True


def remove_stale_temporaries(path: str) -> list[str]:
    """Remove the temporary files that writers of `path` which no longer run (killed during a
    save) left beside it; returns their paths. Another live writer's file is left alone.

    Only regular files whose name is exactly what `atomic_output` makes for `path` are touched
    (`.<stem>.<pid>.<8 random characters>.tmp`); anything else, however similar, stays. Cleanup is
    best effort: a file it cannot list, read or remove is left, and it never raises.
    """
    parent = os.path.dirname(path)
    removed = []
    if os.name != "posix":
        return removed
    try:
        stem = _tmp_stem(path)
        names = os.listdir(parent)
    except (OSError, ValueError):
        return removed
    for name in names:
        match = _TMP_PATTERN.fullmatch(name)
        if match is None or match["stem"] != stem:
            continue
        candidate = os.path.join(parent, name)
        try:
            if not stat.S_ISREG(os.lstat(candidate).st_mode) or process_exists(int(match["pid"])):
                continue
            os.unlink(candidate)
        except (OSError, ValueError, OverflowError):  # gone already, not ours to remove, a pid no kernel has
            continue
        removed.append(candidate)
    return removed


def _plain_open_mode(path: str) -> int:
    """The permission bits open(path, "w") would leave: an existing file keeps its own,
    a new one gets 0o666 minus the umask."""
    try:
        return os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)  # reading the umask means setting it; put it straight back
        os.umask(umask)
        return 0o666 & ~umask


_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _device_of(folder: str) -> str:
    """The file system `folder` lies on, in words: its device and mount point where /proc says."""
    mount = os.path.realpath(folder)
    while not os.path.ismount(mount) and os.path.dirname(mount) != mount:
        mount = os.path.dirname(mount)
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            sources = {fields[1]: fields[0] for fields in (line.split() for line in f) if len(fields) > 1}
    except OSError:
        sources = {}
    source = sources.get(mount)
    return f"{source} (mounted on {mount})" if source else f"the file system mounted on {mount}"


def _no_space(error: OSError, path: str, tmp: str | None, size: int | None) -> InputError:
    """The one-line error for a full disk or an exhausted quota while writing `path`: N MB is `size`
    when the caller knows it, else what the temporary held when the write failed."""
    needed = size
    if needed is None:
        with contextlib.suppress(OSError, TypeError):
            needed = os.path.getsize(tmp)
    amount = f"{max(1, math.ceil(needed / 2**20))} MB needed" if needed else "size unknown"
    full = "no space left" if error.errno == errno.ENOSPC else "disk quota exceeded, no space left"
    return InputError(f"{full} on {_device_of(os.path.dirname(os.path.abspath(path)))} writing {path} ({amount})")


@contextlib.contextmanager
def atomic_output(path: str, size: int | None = None):
    """Write `path` atomically: yields a temporary path next to it for the caller to write.

    On success the temporary file is flushed to disk, given the mode a plain
    open(path, "w") would give (see _plain_open_mode) and renamed over `path`,
    so `path` only ever holds a complete file; on any failure it is removed.
    A `path` that is a symbolic link is written through, as open(path, "w")
    does: the link stays, and the file it leads to (created if missing) gets
    the new content, atomically. The temporary's name fits the file system's
    NAME_MAX whatever the length of `path`'s name.
    The parent folder is created. Temporaries that a killed writer of the same
    target left behind are removed first. Raises InputError when `path` is a folder,
    and, with the previous file kept, when the disk or the quota is full
    ("no space left on DEVICE writing PATH (N MB needed)"; `size`, the bytes to be
    written when known, gives N, else the temporary's size when the write failed).
    """
    given = path
    path = os.path.realpath(path)  # a link is written through: the rename lands on its target
    if os.path.isdir(path):
        raise InputError(f"output path {given!r} is a folder, expected a file name")
    parent = os.path.dirname(path)
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path, os.getpid()), suffix=TMP_SUFFIX, dir=parent)
        os.close(fd)
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _plain_open_mode(path))
        os.replace(tmp, path)
    except OSError as error:
        full = error.errno in _FULL
        problem = _no_space(error, given, tmp, size) if full else None
        _remove(tmp)
        if full:
            raise problem from None
        raise
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: str | None) -> None:
    if tmp is not None:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` (UTF-8, newlines as given) to `path` through atomic_output."""
    data = text.encode("utf-8")
    with atomic_output(path, size=len(data)) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_torch_save(obj, path: str) -> None:
    """`torch.save` through atomic_output."""
    import torch

    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def _file_id(path: str):
    """(device, inode) of the file `path` leads to (links followed), or None when there is none."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def check_outputs_spare_inputs(outputs: dict, inputs: dict, reads_member=None) -> None:
    """Raise InputError, before any work, when an output cannot be written (`check_output_path`: a
    folder, a name beyond NAME_MAX, a parent that is a file), or would replace an input or another output.

    `outputs` and `inputs` map what a path is for (an option name, "OUT_JSON") to the path. Files are
    compared as the file system sees them (os.stat's device and inode), so a symbolic link, a hard
    link or another spelling of an input's path is that input; two outputs not written yet are the
    same when their resolved paths are. An input that is a folder (an image
    folder) counts each file directly in it, or only those for which `reads_member(path)` is true.
    """
    for label, path in outputs.items():
        if path:
            try:
                check_output_path(path)
            except InputError as error:
                raise InputError(f"{label}: {error}") from None
    seen = {}
    for label, path in inputs.items():
        if not path:
            continue
        if os.path.isdir(path):
            with os.scandir(path) as entries:
                for entry in entries:
                    member = os.path.join(path, entry.name)
                    file_id = _file_id(member)
                    if file_id is not None and os.path.isfile(member):
                        seen.setdefault(file_id, (f"{label} {path!r}", member))
        else:
            file_id = _file_id(path)
            if file_id is not None:
                seen.setdefault(file_id, (f"{label} {path!r}", None))
    for label, path in outputs.items():
        if not path:
            continue
        # a file that is not there yet is known by the path atomic_output would write (links and ".." resolved)
        file_id = _file_id(path) or ("new", os.path.realpath(path))
        if file_id not in seen:
            seen[file_id] = (f"output {label} {path!r}", "output")
            continue
        what, member = seen[file_id]
        if member == "output":
            raise InputError(f"{label} {path!r} is the same file as {what}; give each output its own path")
        if member is not None and reads_member is not None and not reads_member(member):
            continue
        inside = f" (the file {os.path.basename(member)!r} in it)" if member else ""
        raise InputError(f"{label} {path!r} is the input {what}{inside}: writing it would replace that input; "
                         f"choose another output path")
