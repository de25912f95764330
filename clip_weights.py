"""OpenAI CLIP models built from plain weights files, with no code run from any file.

OpenAI publishes CLIP as TorchScript archives, and `clip.load` reads a file
with `torch.jit.load` (which runs the archive's TorchScript) or else with a
plain `torch.load` (which runs whatever a pickle names). Here instead:

- `fetch(name)` (hw3_download.sh, `python3 hw3_cache.py clip`) downloads the
  archive into a .part file, checks it against the SHA-256 that OpenAI's URL
  names, reads its tensors with `read_archive` and saves them once as a plain
  state dict (torch.save, atomic) at `cached_path(name)`; the archive is then
  deleted. A failed download leaves neither the .part file nor an empty folder.
- `load_clip(name or file, device)` reads a state dict with weights.torch_load
  (tensors and plain containers only), or a TorchScript archive with
  `read_archive`, builds `clip.model.CLIP` at the size its tensors give
  (as `clip.model.build_model` does, without random initialisation) and puts
  them in place: (model, preprocess) as `clip.load(..., jit=False)` returns,
  fp16 off the CPU, fp32 on it.

`read_archive` unpickles the archive's `data.pkl` with an unpickler that builds
tensors from the archive's storages and records each scripted module's
attributes; it imports nothing but the tensor rebuild and OrderedDict, so no
TorchScript or Python code runs.
"""
from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import sys
import zipfile

import io_utils
from io_utils import InputError

EXPECTED = ("expected OpenAI's CLIP weights (`python3 hw3_cache.py clip NAME` converts OpenAI's archive), "
            "OpenAI's archive itself, or the state_dict() of a clip.model.CLIP")
# tensors of OpenAI's archives that clip.model.build_model reads and drops: sizes, not weights
_SIZE_ENTRIES = ("input_resolution", "context_length", "vocab_size")
_DTYPES = {"FloatStorage": "float32", "HalfStorage": "float16", "DoubleStorage": "float64",
           "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
           "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool"}


def openai_models() -> dict:
    """OpenAI model name -> URL of its archive (the folder of the URL is the file's SHA-256)."""
    from clip.clip import _MODELS

    return dict(_MODELS)


def check_spec(spec: str) -> None:
    """InputError unless `spec` is an OpenAI CLIP model name or a file (cheap: run before any loading)."""
    if spec in openai_models() or os.path.isfile(spec):
        return
    what = "is a folder" if os.path.isdir(spec) else "not found"
    raise InputError(f"CLIP model {spec!r} {what}; expected one of the models {list(openai_models())} "
                     "or the path of a CLIP weights file")


def cached_path(name: str) -> str:
    """Where `fetch` keeps model `name`'s weights (`ViT-L/14@336px` -> <cache>/clip/ViT-L-14-336px.state_dict.pt)."""
    return io_utils.cache_dir("clip", name.replace("/", "-").replace("@", "-") + ".state_dict.pt")


def _archive_path(name: str) -> str:
    """Where `clip.load` kept OpenAI's archive of `name` (converted by `fetch` when found there)."""
    return io_utils.cache_dir("clip", os.path.basename(openai_models()[name]))


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- TorchScript archives, read as data

class _ScriptObject:
    """A scripted module (or other TorchScript object) of an archive: only its attributes are kept."""

    def __setstate__(self, state):
        self.attributes = state


class _Storage:
    """The pickled storage class of an archive's tensor: its dtype."""

    def __init__(self, dtype_name: str):
        self.dtype_name = dtype_name


def _rebuild_tensor(flat, offset, size, stride, *unused):
    import torch

    return torch.as_strided(flat, tuple(size), tuple(stride), offset)


def _unchanged(value, *unused):
    return value


class _ArchiveUnpickler(pickle.Unpickler):
    """Reads an archive's data.pkl: scripted modules become _ScriptObject, tensors views of storages
    read from the archive's data/ entries; any other class or function is refused unimported."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__.") or module == "__torch__":
            return _ScriptObject
        if module == "torch" and name in _DTYPES:
            return _Storage(_DTYPES[name])
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name in ("build_intlist", "build_doublelist", "build_boollist",
                                                      "build_tensorlist", "restore_type_tag"):
            return _unchanged
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        import torch

        kind, storage, key, _location, numel = pid  # ('storage', its class, file name, device, elements)
        if kind != "storage" or not isinstance(storage, _Storage):
            raise pickle.UnpicklingError(f"a persistent object {kind!r}")
        dtype = getattr(torch, storage.dtype_name)
        data = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
        flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        if flat.numel() != numel:
            raise pickle.UnpicklingError(f"storage {key} holds {flat.numel()} values, its record says {numel}")
        return flat


class ArchiveError(ValueError):
    """The TorchScript archive at `path` cannot be read as weights: `reason` says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def torchscript_prefix(path: str) -> str | None:
    """'<folder>/' of the TorchScript archive at `path` (code/ and constants.pkl beside data.pkl), else None."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
    for name in names:
        folder, _, leaf = name.partition("/")
        if leaf == "data.pkl" and f"{folder}/constants.pkl" in names:
            return folder + "/"
    return None


def read_archive(path: str) -> dict:
    """{name: tensor} of every tensor attribute in the TorchScript archive at `path`, named by its module
    path as state_dict() names it (attributes that are not weights, such as an attention mask, included).

    Raises ArchiveError (a ValueError) naming what the archive holds that is not a module, tensor or
    plain container, or how it is damaged.
    """
    prefix = torchscript_prefix(path)
    if prefix is None:
        raise ArchiveError(path, "it is not a TorchScript archive")
    with zipfile.ZipFile(path) as archive:
        try:
            root = _ArchiveUnpickler(io.BytesIO(archive.read(prefix + "data.pkl")), archive, prefix).load()
        except pickle.UnpicklingError as error:
            raise ArchiveError(path, f"it is a TorchScript archive holding {error}, not only modules and "
                                     "tensors") from None
        # a damaged archive fails in many ways (zlib, KeyError for a storage, EOFError...)
        except Exception as error:  # noqa: BLE001
            raise ArchiveError(path, f"it is a damaged TorchScript archive ({type(error).__name__}: "
                                     f"{error})") from None
    import torch

    state = {}

    def collect(obj: _ScriptObject, prefix: str) -> None:
        attributes = getattr(obj, "attributes", None)
        for key, value in attributes.items() if isinstance(attributes, dict) else ():
            if torch.is_tensor(value):
                state[prefix + key] = value
            elif isinstance(value, _ScriptObject):
                collect(value, f"{prefix}{key}.")
    collect(root, "")
    if not state:
        raise ArchiveError(path, "it is a TorchScript archive with no tensors")
    return state


# ---------------------------------------------------------------- download and conversion (hw3_cache.py clip)

def _download(url: str, path: str) -> str:
    """`url` into `path`; returns its SHA-256."""
    import urllib.request

    from tqdm import tqdm

    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as source, open(path, "wb") as out:
        total = int(source.info().get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path), file=sys.stderr) as bar:
            for block in iter(lambda: source.read(1 << 20), b""):
                out.write(block)
                digest.update(block)
                bar.update(len(block))
    return digest.hexdigest()


def _convert_trusted(archive: str) -> dict:
    """The tensors of OpenAI's archive, whose SHA-256 was checked: read as data; should this torch's
    format ever be one read_archive does not know, the archive is trusted enough for torch.jit.load."""
    try:
        return read_archive(archive)
    except ValueError as error:
        import torch

        print(f"note: {error}; converting OpenAI's checksum-verified archive with torch.jit.load", file=sys.stderr)
        return dict(torch.jit.load(archive, map_location="cpu").state_dict())


def fetch(name: str, purpose: str = "") -> str:
    """OpenAI CLIP `name` as a plain state dict at `cached_path(name)` (returned): downloaded, checked
    against OpenAI's SHA-256 and converted, unless already there. An archive `clip.load` left in the cache
    is converted without a download when its checksum matches. `purpose` ends a failed download's advice."""
    from file_io import atomic_torch_save

    models = openai_models()
    if name not in models:
        raise InputError(f"CLIP model {name!r} not found; available models = {list(models)}")
    target = cached_path(name)
    if os.path.isfile(target):
        return target
    url = models[name]
    checksum = url.split("/")[-2]
    archive = _archive_path(name)
    if not (os.path.isfile(archive) and file_sha256(archive) == checksum):
        archive += ".part"
        io_utils.make_cache_folder(archive)
        print(f"downloading CLIP {name} from {url}", file=sys.stderr)
        try:
            found = _download(url, archive)
            if found != checksum:
                raise InputError(f"the download of CLIP {name} from {url} has SHA-256 {found}, OpenAI's is "
                                 f"{checksum}: a damaged or replaced file; nothing installed")
        except BaseException as error:
            if os.path.lexists(archive):
                os.remove(archive)
            io_utils.remove_empty_cache_folders(archive)
            if isinstance(error, OSError):  # urllib's URLError (offline), HTTP errors, a full disk
                raise InputError(f"could not download CLIP {name} from {url} ({error}). On a machine with the "
                                 f"network, `python3 hw3_cache.py clip {name}` puts it into {os.path.dirname(target)} "
                                 f"(as `bash hw3_download.sh` does for Problem 1's models){purpose}") from None
            raise
    state = _convert_trusted(archive)
    atomic_torch_save(weights_of(state, name, from_archive=True), target)
    os.remove(archive)
    print(f"CLIP {name}: OpenAI's archive checked (SHA-256) and converted to {target}", file=sys.stderr)
    return target


# ---------------------------------------------------------------- loading

def read_state(path: str, source: str) -> dict:
    """{name: tensor}, the CLIP weights in the file at `path`: a state dict (read weights only) or a
    TorchScript archive (read as data). InputError in one line when it is neither."""
    import torch

    from weights import NotWeightsFile, torch_load

    if torchscript_prefix(path) is not None:
        try:
            state = read_archive(path)
        except ArchiveError as error:
            raise InputError(f"{source!r} is not a CLIP checkpoint: {error.reason}; {EXPECTED}") from None
        return weights_of(state, source, from_archive=True)
    else:
        try:
            state = torch_load(path, mmap=True)  # guarded in torch_load
        except NotWeightsFile as error:
            raise InputError(f"{source!r} is not a CLIP checkpoint: {error.reason}; {EXPECTED}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise InputError(f"{source!r} is not a CLIP checkpoint: it holds a {type(state).__name__} that is not a "
                         f"mapping of names to tensors; {EXPECTED}")
    return weights_of(state, source, from_archive=False)


def architecture(state: dict, source: str) -> dict:
    """clip.model.CLIP's arguments for the weights `state`, read from their shapes as
    clip.model.build_model reads them (heads = width / 64)."""
    def shape(key: str) -> tuple:
        if key not in state:
            raise InputError(f"{source!r} is not a CLIP checkpoint: it has no tensor {key!r}; {EXPECTED}")
        return tuple(state[key].shape)

    def count(prefix: str, position: int) -> int:
        return len({k.split(".")[position] for k in state if k.startswith(prefix)})

    if "visual.proj" in state:  # a vision transformer
        width, _, patch, _ = shape("visual.conv1.weight")
        vision_layers = count("visual.transformer.resblocks.", 3)
        grid = round((shape("visual.positional_embedding")[0] - 1) ** 0.5)
        resolution = patch * grid
    else:  # a ResNet
        vision_layers = tuple(count(f"visual.layer{b}.", 2) for b in (1, 2, 3, 4))
        width, patch = shape("visual.layer1.0.conv1.weight")[0], None
        resolution = round((shape("visual.attnpool.positional_embedding")[0] - 1) ** 0.5) * 32
    text_width = shape("ln_final.weight")[0]
    return dict(embed_dim=shape("text_projection")[1], image_resolution=resolution, vision_layers=vision_layers,
                vision_width=width, vision_patch_size=patch, context_length=shape("positional_embedding")[0],
                vocab_size=shape("token_embedding.weight")[0], transformer_width=text_width,
                transformer_heads=text_width // 64, transformer_layers=count("transformer.resblocks.", 2))


def _empty_model(state: dict, source: str):
    """clip.model.CLIP at the size `state` gives, not initialised, its tensors on the meta device
    (weights.without_data): their names, shapes and dtypes, no memory."""
    from clip.model import CLIP

    from weights import skip_init, without_data

    with skip_init():
        return without_data(CLIP(**architecture(state, source)))


def weights_of(state: dict, source: str, from_archive: bool) -> dict:
    """The tensors of `state` that a CLIP of its size holds, all of them present. OpenAI's archives also
    keep its size entries and tensors that are plain attributes (the text attention mask): dropped. A state
    dict holds exactly the weights: another tensor means another model."""
    expected = set(_empty_model(state, source).state_dict())
    weights = {k: v for k, v in state.items() if k not in _SIZE_ENTRIES}
    extra = sorted(set(weights) - expected)
    if extra and not from_archive:
        raise InputError(f"{source!r} is not a CLIP checkpoint: it holds {len(extra)} tensor(s) that a CLIP of the "
                         f"size its other tensors give does not have, e.g. {extra[:3]}; {EXPECTED}")
    missing = sorted(expected - set(weights))
    if missing:
        raise InputError(f"{source!r} is not a complete CLIP checkpoint: {len(missing)} weight(s) missing, "
                         f"e.g. {missing[:3]}; {EXPECTED}")
    return {k: v for k, v in weights.items() if k in expected}


def build(state: dict, source: str, device):
    """clip.model.CLIP holding `state` (from `read_state`) as clip.load(..., jit=False) gives it: the
    layers clip.model.convert_weights names in fp16 (so weights pass through fp16, as there), the whole
    model cast to fp32 on the CPU. No random initialisation (weights.skip_init).

    clip.load converts the new model's layers to fp16 before it copies the weights in. Here the
    conversion runs on a model without data (`_empty_model`), so no uninitialised memory is cast; it
    only sets the dtype in which each of the file's tensors is then put in place."""
    from clip.model import convert_weights

    from weights import assign_state

    model = _empty_model(state, source)
    convert_weights(model)
    try:
        assign_state(model, state, source, device=device,
                     cause="its tensors disagree about the model's size (width, layers and resolution are read "
                           "from them), so they are not one CLIP's weights")
    except ValueError as error:  # a shape other than the one the file's own sizes give
        raise InputError(str(error)) from None
    model.to(device)
    return (model.float() if device.type == "cpu" else model).eval()


def load_clip(spec: str, device, purpose: str = "") -> tuple:
    """(model, preprocess) for an OpenAI model name (from the cache; fetched when missing, unless offline)
    or a CLIP weights file. `purpose` ends the offline error's advice (e.g. "or pass --clip-model FILE")."""
    from clip.clip import _transform

    if spec in openai_models():
        path = cached_path(spec)
        if not os.path.isfile(path):
            if io_utils.hub_offline() and not os.path.isfile(_archive_path(spec)):
                raise InputError(f"CLIP {spec} is not in {os.path.dirname(path)} and this run is offline "
                                 f"(HF_HUB_OFFLINE): fetch it first with `bash hw3_download.sh` or `python3 "
                                 f"hw3_cache.py clip {spec}`{purpose}")
            print(f"note: CLIP {spec} is not in {os.path.dirname(path)}; downloading it now "
                  "(`bash hw3_download.sh` fetches it beforehand)", file=sys.stderr)
            path = fetch(spec, purpose)
    else:
        check_spec(spec)
        path = spec
    try:
        state = read_state(path, spec)
    except InputError as error:
        if path == spec:
            raise
        raise InputError(f"the cached CLIP {spec} {path!r} cannot be used ({error}): delete it and fetch it again "
                         f"with `python3 hw3_cache.py clip {spec}`{purpose}") from None
    model = build(state, spec, device)
    return model, _transform(model.visual.input_resolution)
