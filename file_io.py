"""The course's JSON files in, outputs out: read with clear errors, written atomically.

Outputs are written to a temporary file next to the target and renamed over
it (`atomic_output`), so a crash never leaves a half-written file behind, and
they get the mode a plain open() would give them.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
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


def _tmp_prefix(path: str, pid: int) -> str:
    """Temporary files for `path` are `.<name>.<pid>.<random>.tmp` beside it: hidden, and
    naming the process that writes them, so that a dead writer's leftovers can be found."""
    return f".{os.path.basename(path)}.{pid}."


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process is there
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and belongs to another user
        return True
    return True


def remove_stale_temporaries(path: str) -> list[str]:
    """Remove the temporary files that writers of `path` which no longer run (killed during a
    save) left beside it; returns their paths. Another live writer's file is left alone."""
    parent, stem = os.path.dirname(path), f".{os.path.basename(path)}."
    removed = []
    if os.name != "posix" or not os.path.isdir(parent):
        return removed
    for name in os.listdir(parent):
        if not (name.startswith(stem) and name.endswith(TMP_SUFFIX)):
            continue
        pid = name[len(stem):-len(TMP_SUFFIX)].split(".")[0]
        if not pid.isdigit() or _process_exists(int(pid)):
            continue
        with contextlib.suppress(FileNotFoundError):  # another writer may have cleaned it already
            os.unlink(os.path.join(parent, name))
            removed.append(os.path.join(parent, name))
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


@contextlib.contextmanager
def atomic_output(path: str):
    """Write `path` atomically: yields a temporary path next to it for the caller to write.

    On success the temporary file is flushed to disk, given the mode a plain
    open(path, "w") would give (see _plain_open_mode) and renamed over `path`,
    so `path` only ever holds a complete file; on any failure it is removed.
    The parent folder is created. Temporaries that a killed writer of the same
    target left behind are removed first. Raises InputError when `path` is a folder.
    """
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise InputError(f"output path {path!r} is a folder, expected a file name")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path, os.getpid()), suffix=TMP_SUFFIX, dir=parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _plain_open_mode(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` (UTF-8, newlines as given) to `path` through atomic_output."""
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)


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
    """Raise InputError, before any work, when an output would replace an input or another output.

    `outputs` and `inputs` map what a path is for (an option name, "OUT_JSON") to the path. Files are
    compared as the file system sees them (os.stat's device and inode), so a symbolic link, a hard
    link or another spelling of an input's path is that input. An input that is a folder (an image
    folder) counts each file directly in it, or only those for which `reads_member(path)` is true.
    """
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
        file_id = _file_id(path) if path else None
        if file_id is None or file_id not in seen:
            if file_id is not None:
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
