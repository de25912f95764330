"""The Python steps of `hw3_download.sh`: where each download goes, and the
fetches that need Python (CLIP and timm weights).

Everything lands in the repository-local cache (`io_utils.cache_dir()`:
`cache/`, or $HW3_CACHE), exactly where hw3_1.sh and hw3_2.sh look, so that
after one `bash hw3_download.sh` both run offline:

  p2_checkpoint.pt         io_utils.p2_checkpoint() (when $HW3_P2_CKPT is unset)
  clip/ViT-L-14*.state_dict.pt
                           clip_weights.cached_path (each of p1_zeroshot.DEFAULT_MODELS):
                           OpenAI's archive, checked and converted to plain weights
  timm/<encoder>.pth       encoder.cached_weights_path (the checkpoint's encoder)

GPT-2's vocabulary is part of the repository (encoder.json, vocab.bpe): nothing to fetch.

wget and gdown write into `<target>.part`; `install` checks the file and only
then renames it over the target, so a failed or half-finished download never
leaves a file that looks complete (and bash may not `rm` or `mv`); `discard`
removes what a failed download left: the .part file, and the cache folders it
leaves empty.

    python3 hw3_cache.py part checkpoint       # check the target (no folder, no link), remove a leftover
                                               # .part, create its folder, print the .part path
    python3 hw3_cache.py install checkpoint    # check the .part file, move it into place
    python3 hw3_cache.py discard checkpoint    # after a failed download: remove the .part file, empty folders
    python3 hw3_cache.py clip [NAME ...]       # CLIP weights (default: Problem 1's)
    python3 hw3_cache.py encoder               # timm weights for Problem 2
"""
from __future__ import annotations

import argparse
import os
import sys

import file_io
import io_utils

DOWNLOADS = ("checkpoint",)


def target(name: str) -> str:
    """Final path of a file bash downloads: `checkpoint`."""
    if name == "checkpoint":
        return io_utils.cache_dir(io_utils.P2_CHECKPOINT_NAME)
    raise io_utils.InputError(f"unknown download {name!r}; expected one of {list(DOWNLOADS)}")


def part(name: str) -> str:
    """Where wget/gdown write `name` before `install` checks it; its folder is created."""
    path = target(name) + ".part"
    io_utils.make_cache_folder(path)
    return path


def check_target(name: str) -> None:
    """InputError, before a download, unless `name`'s target and .part file can be written: neither is
    a folder or under a file, and the target is no symbolic link (a download renamed over it would
    replace the link, not the file it leads to: the user's own checkpoint, perhaps; so it is refused)."""
    path = target(name)
    for where in (path, path + ".part"):
        file_io.check_output_path(where)
    if os.path.islink(path):
        raise io_utils.InputError(f"{path} is a symbolic link to {os.readlink(path)!r}: the download is not "
                                  "installed over a link (nor through it, over the file it leads to); "
                                  "remove or move the link, then download again")


def start_download(name: str) -> str:
    """`part`, for bash: its folder created (a cache that cannot be written is named first), the target
    checked, a .part left by an earlier try removed (wget -O would write through a link there)."""
    path = part(name)
    check_target(name)
    if os.path.lexists(path):
        os.remove(path)
    return path


def discard(name: str) -> None:
    """What a failed download of `name` left: its .part file, and the cache folders that leaves empty."""
    path = target(name) + ".part"
    if os.path.lexists(path):
        os.remove(path)
    io_utils.remove_empty_cache_folders(path)


def install_checkpoint() -> None:
    """Check the downloaded checkpoint and move it into place; a bad one is discarded."""
    from captioner import read_checkpoint

    path = part("checkpoint")
    if not os.path.isfile(path):
        discard("checkpoint")
        raise io_utils.InputError(f"download failed, no {path}")
    try:
        read_checkpoint(path)
    # a failed download is an HTML page, an empty or a cut file: any parse error means "bad file"
    except Exception as error:  # noqa: BLE001
        discard("checkpoint")
        raise io_utils.InputError(f"the download of the checkpoint is not usable ({error}); nothing installed")
    check_target("checkpoint")
    os.replace(path, target("checkpoint"))
    print(f"installed {target('checkpoint')}", file=sys.stderr)


def fetch_clip(names=None) -> list:
    """CLIP models `names` (default: every one Problem 1 uses) into `<cache>/clip` as plain weights:
    OpenAI's archive downloaded, checked against its SHA-256 and converted (clip_weights.fetch)."""
    import clip_weights
    import p1_zeroshot

    specs = p1_zeroshot.model_specs(",".join(names) if names else p1_zeroshot.DEFAULT_MODELS)
    for spec in specs:
        if spec in clip_weights.openai_models():
            print(f"CLIP {spec} is in {clip_weights.fetch(spec)}", file=sys.stderr)
        else:
            print(f"CLIP {spec} is a local file: nothing to fetch", file=sys.stderr)
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
        io_utils.remove_empty_cache_folders(path)
        raise io_utils.InputError(f"could not download encoder weights {name!r}: {error}")


@io_utils.reports_input_errors
def main(argv=None) -> None:
    io_utils.quiet_known_warnings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{part,install,discard,clip,encoder}")
    for name, line, what in (
            ("part", "print where wget/gdown write NAME before it is checked (its folder is created)", "checkpoint"),
            ("install", "check the downloaded NAME and move it into the cache", "checkpoint"),
            ("discard", "after a failed download of NAME: remove its .part file and the cache folders left empty",
             "checkpoint"),
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
        print(start_download(args.name))
    elif args.command == "install":
        target(args.name)  # an unknown name is refused
        install_checkpoint()
    elif args.command == "discard":
        discard(args.name)
    elif args.command == "clip":
        fetch_clip(args.names)
    else:
        fetch_encoder()


if __name__ == "__main__":
    main()
