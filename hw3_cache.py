"""The Python steps of `hw3_download.sh`: where each download goes, and the
fetches that need Python (CLIP and timm weights).

Everything lands in the repository-local cache (`io_utils.cache_dir()`:
`cache/`, or $HW3_CACHE), exactly where hw3_1.sh and hw3_2.sh look, so that
after one `bash hw3_download.sh` both run offline:

  p2_checkpoint.pt         io_utils.p2_checkpoint() (when $HW3_P2_CKPT is unset)
  clip/ViT-L-14*.pt        p1_zeroshot.load_clip (each of p1_zeroshot.DEFAULT_MODELS)
  timm/<encoder>.pth       encoder.cached_weights_path (the checkpoint's encoder)
  gpt2/encoder.json, gpt2/vocab.bpe
                           tokenizer.find_vocab_dir

wget and gdown write into `<target>.part`; `install` checks the file and only
then renames it over the target, so a failed or half-finished download never
leaves a file that looks complete (and bash may not `rm` or `mv`).

    python3 hw3_cache.py part checkpoint|encoder.json|vocab.bpe   # print the .part path, create its folder
    python3 hw3_cache.py install checkpoint|gpt2                  # check the .part file(s), move into place
    python3 hw3_cache.py has gpt2                                 # exit 0 if the GPT-2 vocabulary is usable
    python3 hw3_cache.py clip [NAME ...]                          # CLIP weights (default: Problem 1's)
    python3 hw3_cache.py encoder                                  # timm weights for Problem 2
"""
from __future__ import annotations

import argparse
import os
import sys

import io_utils

GPT2_FILES = ("encoder.json", "vocab.bpe")


def target(name: str) -> str:
    """Final path of a downloaded file: `checkpoint` or one of GPT2_FILES."""
    if name == "checkpoint":
        return io_utils.cache_dir(io_utils.P2_CHECKPOINT_NAME)
    if name in GPT2_FILES:
        return io_utils.cache_dir("gpt2", name)
    raise io_utils.InputError(f"unknown download {name!r}; expected checkpoint or one of {list(GPT2_FILES)}")


def part(name: str) -> str:
    """Where wget/gdown write `name` before `install` checks it; its folder is created."""
    path = target(name) + ".part"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def _install(names: tuple, check) -> None:
    parts = [part(n) for n in names]
    missing = [p for p in parts if not os.path.isfile(p)]
    if missing:
        raise io_utils.InputError(f"download failed, no {missing}")
    try:
        check(*parts)
    # a failed download is an HTML page, an empty or a cut file: any parse error means "bad file"
    except Exception as error:  # noqa: BLE001
        for path in parts:
            os.remove(path)
        raise io_utils.InputError(f"the download of {', '.join(names)} is not usable ({error}); nothing installed")
    for name, path in zip(names, parts):
        os.replace(path, target(name))
        print(f"installed {target(name)}", file=sys.stderr)


def install_checkpoint() -> None:
    from captioner import read_checkpoint

    _install(("checkpoint",), read_checkpoint)


def install_gpt2() -> None:
    from tokenizer import BPETokenizer

    _install(GPT2_FILES, BPETokenizer)


def has_gpt2() -> bool:
    """True when the tokenizer finds a readable GPT-2 vocabulary where p2_inference looks."""
    from tokenizer import BPETokenizer

    try:
        BPETokenizer()
    except (OSError, ValueError):
        return False
    return True


def fetch_clip(names=None) -> list:
    """CLIP models `names` (default: every one Problem 1 uses) into `<cache>/clip` (clip.load skips a
    file it already has)."""
    import torch

    import p1_zeroshot

    specs = p1_zeroshot.model_specs(",".join(names) if names else p1_zeroshot.DEFAULT_MODELS)
    for spec in specs:
        p1_zeroshot.load_clip(spec, torch.device("cpu"))
        print(f"CLIP {spec} is in {io_utils.cache_dir('clip')}", file=sys.stderr)
    return specs


def encoder_name() -> str:
    """The encoder Problem 2 will load: the one the checkpoint names, else the default."""
    from captioner import read_checkpoint
    from encoder import DEFAULT_ENCODER

    path = io_utils.p2_checkpoint()
    if not os.path.isfile(path):
        print(f"note: no checkpoint at {path}; fetching the default encoder {DEFAULT_ENCODER}", file=sys.stderr)
        return DEFAULT_ENCODER
    return read_checkpoint(path)["config"]["encoder"]["name"]


def fetch_encoder() -> str:
    """The encoder's timm weights into `encoder.cached_weights_path`, unless already there."""
    import encoder

    name = encoder_name()
    path = encoder.cached_weights_path(name)
    if os.path.isfile(path):
        print(f"encoder {name} is in {path}", file=sys.stderr)
        return path
    try:
        return encoder.download_weights(name)
    # timm's hub download fails in many ways (offline, HTTP, disk); the message says which
    except Exception as error:  # noqa: BLE001
        raise io_utils.InputError(f"could not download encoder weights {name!r}: {error}")


@io_utils.reports_input_errors
def main(argv=None) -> None:
    io_utils.quiet_known_warnings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{part,install,has,clip,encoder}")
    for name, line, what in (
            ("part", "print where wget/gdown write NAME before it is checked (its folder is created)",
             "checkpoint, encoder.json or vocab.bpe"),
            ("install", "check the downloaded NAME and move it into the cache", "checkpoint or gpt2"),
            ("has", "exit 0 when NAME is usable where inference looks for it, else 1", "gpt2"),
            ("clip", "download CLIP weights into the cache", None),
            ("encoder", "download the timm encoder the checkpoint names (else the default) into the cache", None)):
        sub = commands.add_parser(name, help=line, description=line)
        if what:
            sub.add_argument("name", metavar="NAME", help=what)
        if name == "clip":
            sub.add_argument("names", nargs="*", metavar="NAME", help="CLIP model names (default: Problem 1's, "
                             "HW3_P1_CLIP's default; ViT-B/32 is p2_evaluate.py's)")
    args = parser.parse_args(argv)
    if args.command == "part":
        print(part(args.name))
    elif args.command == "install":
        installers = {"checkpoint": install_checkpoint, "gpt2": install_gpt2}
        if args.name not in installers:
            raise io_utils.InputError(f"install what? {args.name!r}; expected one of {sorted(installers)}")
        installers[args.name]()
    elif args.command == "has":
        if args.name != "gpt2":
            raise io_utils.InputError(f"has what? {args.name!r}; expected gpt2")
        sys.exit(0 if has_gpt2() else 1)
    elif args.command == "clip":
        fetch_clip(args.names)
    else:
        fetch_encoder()


if __name__ == "__main__":
    main()
