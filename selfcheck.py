"""Check a submission the way the graders will see it, before they do.

    python3 selfcheck.py [--repo DIR] [--checkpoint CKPT] [--decoder-weights BIN]
                         [--p1-images DIR --id2label JSON] [--p2-images DIR] [--skip-run]

Each check prints one line, PASS / FAIL / WARN / SKIP (with the reason), and
the exit status is 1 when any check FAILs. The checks: the graders' script
rules; no hard-coded absolute paths in the Python they run; the report PDF (a
report build_report.py made with a gap left, such as "Student: name / ID" or a
value "not measured", FAILs with the command that fills each) and the files
tracked by git; the Problem 2 checkpoint (format, parameters < 35M);
`bash hw3_1.sh` and `bash hw3_2.sh` on sample images with their outputs checked
exactly; a test-set time estimate against the limits; Python 3.8 / torch 1.12.

The scripts run with this shell's environment, so what is checked is the real
setup (see "Environment" below). Without image folders,
synthetic ones are generated (synthetic.py), including grayscale, CMYK and a
file name with spaces and several dots.

torch and the model stack are imported only by the checks that use them, so
the static checks (`--skip-run`, no checkpoint) never load them.

Environment (read here and by the scripts it runs):
  HW3_P2_CKPT             the checkpoint checked (default `<cache>/p2_checkpoint.pt`)
  HW3_P2_ENCODER_WEIGHTS  the encoder's weights file (default: as hw3_2.sh finds them)
  HW3_P1_CLIP, HW3_CACHE  as hw3_1.sh reads them (default: ViT-L/14 + ViT-L/14@336px, `<repo>/cache`)
"""
from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import numpy as np

import file_io
import image_io
import io_utils
import report_record
import script_rules
import synthetic
from io_utils import REPO_ROOT

MAX_FILE_BYTES = 50 * 1000 * 1000  # the course's "GitHub's maximum capacity (50 MB)"
MAX_GAPS_SHOWN = 12  # of an unfinished report's gaps
DEFAULT_SAMPLES = 50


class Problem(NamedTuple):
    script: str
    limit_s: int  # the graders' limit for the whole test set
    test_images: int


PROBLEMS = {"P1": Problem("hw3_1.sh", 10 * 60, 2500), "P2": Problem("hw3_2.sh", 40 * 60, 1404)}
SAMPLE_CLASSES = {"0": "apple", "1": "aquarium_fish", "2": "bicycle", "3": "maple_tree", "4": "sweet_pepper"}

# Roots of hard-coded paths on the students' and the course's machines.
ABSOLUTE_PATH = re.compile(r"^(?:/(?:home|root|mnt|data|datasets?|content|tmp|work|workspace|scratch|kaggle|"
                           r"media|Users|nfs|share|opt|srv|usr|var)(?:/|$)|[A-Za-z]:[\\/]|~[\\/])")
DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
DATA_DIRS = ("hw3_data", "p1_data", "p2_data", "p3_data")
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".safetensors")
VOCAB_FILES = ("encoder.json", "vocab.bpe")


class Result(NamedTuple):
    status: str  # PASS, FAIL, WARN or SKIP
    name: str
    message: str


def verdict(name: str, problems: list, passed: str) -> Result:
    return Result("FAIL", name, "\n".join(problems)) if problems else Result("PASS", name, passed)


# ---------------------------------------------------------------- static checks

def check_scripts(repo: str) -> Result:
    """The course's script rules on every hw3_*.sh; hw3_1.sh and hw3_2.sh pass "$1" "$2" "$3" on."""
    scripts = script_rules.grader_scripts(repo)
    problems = [p for s in scripts for p in script_rules.check_script(s)]
    for problem in PROBLEMS.values():
        path = os.path.join(repo, problem.script)
        if not os.path.isfile(path):
            problems.append(f"{problem.script} is missing: the graders run `bash {problem.script} $1 $2 $3`")
            continue
        with open(path, encoding="utf-8") as f:
            text = "\n".join(script_rules.strip_comment(line) for line in f)
        for n in "123":
            if not any(form in text for form in (f'"${n}"', f'"${{{n}}}"', '"$@"')):
                problems.append(f'{problem.script} does not pass "${n}" (quoted) on to Python')
    names = ", ".join(os.path.basename(s) for s in scripts)
    return verdict("script rules", problems, f"{names} follow the rules")


def absolute_paths(path: str) -> list:
    """Hard-coded absolute paths among the string literals of a Python file (docstrings aside)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, DOCUMENTED) and node.body and isinstance(node.body[0], ast.Expr):
            skip.add(id(node.body[0].value))  # the docstring
        if isinstance(node, ast.JoinedStr):
            skip.update(id(part) for part in node.values[1:])  # f"{root}/data" is relative
    return [f"{os.path.basename(path)}:{node.lineno}: hard-coded path {node.value!r}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
            and ABSOLUTE_PATH.match(node.value)]


def check_absolute_paths(repo: str) -> Result:
    modules = script_rules.grader_modules(repo)
    problems = [p for m in modules for p in absolute_paths(m)]
    return verdict("absolute paths", problems, f"none in the {len(modules)} Python files the scripts run "
                   "(the scripts themselves: see script rules)")


def tracked_files(repo: str):
    """Files git would submit, relative to repo; None outside a git repository."""
    result = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, text=True, check=False)
    return [p for p in result.stdout.split("\0") if p] if result.returncode == 0 else None


def check_report(repo: str) -> Result:
    """A hw3_*.pdf at the root, named hw3_<studentID>.pdf, tracked, with no gap build_report.py recorded."""
    name = "report PDF"
    pdfs = sorted(f for f in os.listdir(repo) if re.fullmatch(r"hw3_.+\.pdf", f))
    if not pdfs:
        return Result("FAIL", name, "no hw3_<studentID>.pdf at the repository root")
    problems = []
    for pdf in pdfs:
        try:
            gaps = report_record.read_gaps(os.path.join(repo, pdf)) or []
        except (OSError, RecursionError) as error:  # a folder, an unreadable file, an absurd record
            problems.append(f"{pdf} cannot be read: {getattr(error, 'strerror', None) or error}")
            continue
        shown = [f"  {what}: {how}" for what, how in gaps[:MAX_GAPS_SHOWN]]
        more = [f"  ... and {len(gaps) - MAX_GAPS_SHOWN} more (the report's last page lists them)"] \
            if len(gaps) > MAX_GAPS_SHOWN else []
        if gaps:
            problems.append(f"{pdf} is not ready to hand in: {len(gaps)} gap(s), each with what fills it:")
            problems += shown + more
    if problems:
        return Result("FAIL", name, "\n".join(problems))
    tracked = tracked_files(repo)
    untracked = [f for f in pdfs if tracked is not None and f not in tracked]
    found = ", ".join(pdfs)
    if untracked:
        return Result("WARN", name, f"{', '.join(untracked)} is not tracked by git: `git add` it")
    if not any(re.fullmatch(r"hw3_[A-Za-z][0-9A-Za-z]{8}\.pdf", f) for f in pdfs):
        return Result("WARN", name, f"found {found}; the course asks for hw3_<studentID>.pdf "
                      "(like hw3_r12345678.pdf): rename it")
    return Result("PASS", name, f"found {found}")


def check_download(repo: str) -> Result:
    """hw3_download.sh must name the trained checkpoint (P2_CKPT_URL), or the graders get none."""
    path = os.path.join(repo, "hw3_download.sh")
    if not os.path.isfile(path):
        return Result("FAIL", "download URL", "hw3_download.sh is missing: the graders fetch checkpoints over "
                                              "50 MB only through it")
    with open(path, encoding="utf-8") as f:
        found = re.search(r"^\s*P2_CKPT_URL=(.*)$", "\n".join(script_rules.strip_comment(line) for line in f), re.M)
    value = found.group(1).strip().strip("'\"") if found else ""
    if not value:
        return Result("FAIL", "download URL", "P2_CKPT_URL at the top of hw3_download.sh is empty: the graders "
                                              "would get no Problem 2 checkpoint; set it to your checkpoint's "
                                              "Google Drive id or URL (public)")
    return Result("PASS", "download URL", f"P2_CKPT_URL = {value}")


def check_tracked_files(repo: str) -> Result:
    name = "tracked files"
    files = tracked_files(repo)
    if files is None:
        return Result("SKIP", name, f"{repo} is not a git repository; the graders clone yours: run this in it")
    problems = []
    for rel in files:
        path = os.path.join(repo, rel)
        parts = rel.split("/")
        if any(part in DATA_DIRS for part in parts[:-1]):
            problems.append(f"{rel}: the dataset must not be pushed")
        elif rel.endswith(WEIGHT_SUFFIXES):
            problems.append(f"{rel}: weights are fetched by hw3_download.sh, not committed")
        elif parts[-1] in VOCAB_FILES and len(parts) > 1:  # the root's copy is the course template's
            problems.append(f"{rel}: a second copy of GPT-2's vocabulary; the tokenizer reads the repository "
                            "root's")
        if os.path.isfile(path) and os.path.getsize(path) > MAX_FILE_BYTES:
            problems.append(f"{rel}: {os.path.getsize(path) / 1e6:.1f} MB, over GitHub's 50 MB: "
                            "fetch it in hw3_download.sh")
    return verdict(name, problems, f"{len(files)} files, none over 50 MB, no data or weights")


# ---------------------------------------------------------------- the Problem 2 checkpoint

def check_checkpoint(path: str, decoder_weights: str | None) -> list:
    """Format and parameter count (the sum of numel over the saved tensors), then, given the decoder
    weights, the course's count on the loaded model: its parameters with requires_grad."""
    name = "P2 checkpoint"
    if not os.path.isfile(path):
        return [Result("FAIL", name, f"no checkpoint at {path}: hw3_2.sh would fail. Train one "
                       "(python3 p2_train.py ... --out FILE) or fetch it (bash hw3_download.sh), "
                       "then pass --checkpoint FILE or set HW3_P2_CKPT")]
    import torch

    import captioner

    try:
        state = captioner.read_checkpoint(path)["state_dict"]
    except Exception as error:  # noqa: BLE001 -- any unreadable file is the same verdict
        return [Result("FAIL", name, f"{path}: {error}; hw3_2.sh reads the {{config, state_dict}} file that "
                       "p2_train.py saves (a bare state_dict, the course template's format, is not enough)")]
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        return [Result("FAIL", name, f"{path}: state_dict values that are not tensors: {not_tensors[:8]}")]
    saved = sum(t.numel() for t in state.values())
    counted = f"{saved:,d} saved parameters (limit < {captioner.MAX_TRAINABLE:,d})"
    if saved >= captioner.MAX_TRAINABLE:
        return [Result("FAIL", name, f"{path}: {counted}: the graders will not grade it")]
    results = [Result("PASS", name, f"{path}: {counted}")]
    if not decoder_weights:
        return results + [Result("SKIP", "P2 model count", "needs --decoder-weights (decoder_model.bin)")]
    try:
        model = captioner.load_checkpoint(path, decoder_weights, os.environ.get("HW3_P2_ENCODER_WEIGHTS") or None)
        captioner.mark_trainable(model, verbose=False)  # load_checkpoint freezes everything for inference
    except Exception as error:  # noqa: BLE001 -- torch.load, shapes, missing encoder weights...
        return results + [Result("FAIL", "P2 model count", f"cannot load {path}: {error}")]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    problems = [] if trainable == saved else [f"the loaded model trains {trainable:,d} parameters, "
                                              f"the checkpoint holds {saved:,d}"]
    return results + [verdict("P2 model count", problems, f"{trainable:,d} requires_grad parameters, as saved")]


# ---------------------------------------------------------------- running the scripts

def image_files(folder: str) -> list:
    """Names of the files in `folder` that the scripts must answer for: the ones that decode
    fully, named in UTF-8 (image_io.list_files skips the others with a warning)."""
    return sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))
                  and io_utils.is_utf8(n) and image_io.is_image(os.path.join(folder, n)))


def make_p1_samples(folder: str, n: int) -> list:
    """n CIFAR-sized (32x32) PNG scenes, one of them with spaces and dots in its name."""
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    names = ["sample 1.v2.png"] + [f"{i:04d}.png" for i in range(1, n)]
    for name in names:
        synthetic.draw_scene(synthetic.random_scene(rng), 32, rng).save(os.path.join(folder, name))
    return names


def make_p2_samples(folder: str, n: int) -> str:
    """n JPEG scenes: `bike.v2.jpg` and n - 1 in the course's naming, grayscale and CMYK among them."""
    synthetic.make_dataset(folder, n_train=0, n_val=n - 1, image_size=224)
    images = os.path.join(folder, "images", "val")
    rng = np.random.default_rng(1)
    synthetic.draw_scene(synthetic.random_scene(rng), 224, rng).save(os.path.join(images, "bike.v2.jpg"))
    return images


def validate_csv(path: str, names: list, id2label: dict) -> list:
    """Problems with hw3_1.sh's CSV: header `filename,label`, one row per image, labels keys of id2label."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as error:
        return [f"is not UTF-8 text: {error}"]
    header = text.split("\n", 1)[0].rstrip("\r")
    if header != "filename,label":
        return [f"header is {header!r}, expected 'filename,label'"]
    rows = [row for row in csv.reader(text.splitlines()[1:]) if row]  # pandas skips blank lines too
    problems = [f"row {row!r} does not have two fields" for row in rows if len(row) != 2]
    got = [row[0] for row in rows if len(row) == 2]
    if sorted(got) != sorted(names):
        problems.append(f"file names differ from the images: missing {sorted(set(names) - set(got))[:5]}, "
                        f"unexpected {sorted(set(got) - set(names))[:5]}, {len(got)} rows for {len(names)} images")
    bad = [row[1] for row in rows if len(row) == 2 and row[1] not in id2label]
    if bad:
        problems.append(f"labels that are not integer keys of id2label: {sorted(set(bad))[:5]}")
    return problems


def validate_json(path: str, names: list) -> list:
    """Problems with hw3_2.sh's JSON: an object keyed by file name less its last extension, clean captions."""
    try:
        data = file_io.read_json(path, "the output")
    except io_utils.InputError as error:
        return [str(error)]
    if not isinstance(data, dict):
        return [f"a JSON {type(data).__name__}, expected an object {{name: caption}}"]
    keys = {io_utils.strip_extension(n) for n in names}
    problems = []
    if set(data) != keys:
        problems.append(f"keys differ from the file names without their last extension: missing "
                        f"{sorted(keys - set(data))[:5]}, unexpected {sorted(set(data) - keys)[:5]}")
    from tokenizer import EOT

    bad = {k: v for k, v in data.items() if not isinstance(v, str) or not v.strip() or EOT in v}
    if bad:
        problems.append(f"captions that are empty, not strings or hold {EOT}: {dict(list(bad.items())[:3])}")
    return problems + degenerate_captions({k: v for k, v in data.items() if k not in bad})


def degenerate_captions(captions: dict) -> list:
    """Signs of a broken model (NaN weights caption everything `!!!!`): captions without a
    letter or digit, or one caption for every image."""
    problems = []
    wordless = {k: v for k, v in captions.items() if not any(c.isalnum() for c in v)}
    if wordless:
        problems.append(f"captions without a letter or digit: {dict(list(wordless.items())[:3])}")
    texts = set(captions.values())
    if len(captions) > 1 and len(texts) == 1:
        problems.append(f"all {len(captions)} captions are the same, {texts.pop()!r}: the model ignores the image")
    return problems


def timed_run(repo: str, script: str, args: list, timeout: float):
    """(seconds, error or None) of `bash script args` from the repository root, with this environment."""
    start = time.perf_counter()
    try:
        result = subprocess.run(["bash", script, *args], cwd=repo, env=dict(os.environ), capture_output=True,
                                text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return timeout, f"still running after {timeout:.0f} s, the graders' limit for the whole test set"
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-8:]
        return seconds, f"exit status {result.returncode}:\n" + "\n".join("    " + line for line in tail)
    return seconds, None


def check_run(repo: str, key: str, folder: str, arguments, validate, work: str, timing: bool,
              slowdown: float = 1.0) -> list:
    """Run problem `key`'s script on `folder` and validate its output; with `timing` (a GPU) also on
    one image, to separate the fixed loading time from the time per image.
    arguments(folder, out) -> the script's arguments; validate(out, names) -> problems."""
    problem = PROBLEMS[key]
    names = image_files(folder)
    if not names:
        return [Result("FAIL", f"{key} run", f"no image in {folder}")]
    out = os.path.join(work, key + "_out", "pred" + (".csv" if key == "P1" else ".json"))  # folder not there yet
    seconds, error = timed_run(repo, problem.script, arguments(folder, out), problem.limit_s)
    if error is None and not os.path.isfile(out):
        error = f"exit status 0 but no {out}"
    problems = [error] if error else [f"{problem.script} output {p}" for p in validate(out, names)]
    run = verdict(f"{key} run", problems, f"bash {problem.script} on {len(names)} images: output exact, "
                  f"{seconds:.1f} s ({seconds / len(names):.2f} s/image)")
    if problems:
        return [run, Result("SKIP", f"{key} time", "the run failed")]
    if not timing:
        return [run, Result("SKIP", f"{key} time", f"no CUDA GPU here: {seconds:.1f} s on the CPU says nothing "
                            "about the graders' RTX 2080 Ti")]
    if len(names) < 2:
        return [run, Result("SKIP", f"{key} time", "needs at least 2 images to separate loading from images")]
    one = os.path.join(work, key + "_one")
    os.makedirs(one)
    shutil.copy(os.path.join(folder, names[0]), one)
    one_seconds, error = timed_run(repo, problem.script, arguments(one, out + ".one"), problem.limit_s)
    if error:
        return [run, Result("FAIL", f"{key} time", f"the run on one image failed: {error}")]
    return [run, estimate(key, one_seconds, seconds, len(names), slowdown)]


def estimate(key: str, one_s: float, many_s: float, n: int, slowdown: float = 1.0) -> Result:
    """The test-set time from runs on 1 and on n images, assuming time = load + per_image * images."""
    problem = PROBLEMS[key]
    per_image = max(many_s - one_s, 0.0) / (n - 1) * slowdown
    load = max(one_s * slowdown - per_image, 0.0)
    total = load + per_image * problem.test_images
    status = "FAIL" if total > problem.limit_s else "WARN" if total > problem.limit_s / 2 else "PASS"
    scaled = f", measured times x {slowdown:g}" if slowdown != 1 else ""
    return Result(status, f"{key} time", f"~{total / 60:.1f} min for {problem.test_images} images (load "
                  f"{load:.0f} s + {per_image:.3f} s/image{scaled}), limit {problem.limit_s // 60} min")


def check_python38(repo: str) -> Result:
    modules = script_rules.grader_modules(repo)
    return verdict("Python 3.8", script_rules.check_python38(modules),
                   f"vermin, ruff, the torch 1.12 API scan and the names taken from torch, timm and clip "
                   f"pass on {len(modules)} files")


# ---------------------------------------------------------------- main

def run_checks(args) -> list:
    repo = os.path.abspath(args.repo)
    decoder = args.decoder_weights or os.path.join(repo, "hw3_data", "p2_data", "decoder_model.bin")
    decoder = decoder if os.path.isfile(decoder) or args.decoder_weights else None
    results = [check_scripts(repo), check_absolute_paths(repo), check_download(repo), check_report(repo),
               check_tracked_files(repo)]
    results += check_checkpoint(args.checkpoint or io_utils.p2_checkpoint(repo), decoder)
    if args.skip_run:
        results += [Result("SKIP", f"{key} {what}", "--skip-run") for key in PROBLEMS for what in ("run", "time")]
    else:
        import torch

        timing = torch.cuda.is_available()
        if timing:
            print(f"timing on {torch.cuda.get_device_name()}; the graders use an RTX 2080 Ti", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="hw3_selfcheck_") as work:
            if args.p1_images:
                p1_images, id2label = args.p1_images, args.id2label
            else:
                p1_images, id2label = os.path.join(work, "p1_images"), os.path.join(work, "id2label.json")
                make_p1_samples(p1_images, args.samples)
                with open(id2label, "w", encoding="utf-8") as f:
                    json.dump(SAMPLE_CLASSES, f)
            classes = file_io.read_json(id2label, "--id2label file")
            if not isinstance(classes, dict):
                raise io_utils.InputError(f"--id2label file {id2label!r} must hold a JSON object mapping class "
                                          f"ids to names, found a JSON {type(classes).__name__}")
            results += check_run(repo, "P1", p1_images, lambda d, out: [d, id2label, out],
                                 lambda out, names: validate_csv(out, names, classes), work, timing, args.slowdown)
            if decoder is None:
                results += [Result("SKIP", f"P2 {what}", "needs --decoder-weights (decoder_model.bin)")
                            for what in ("run", "time")]
            else:
                p2_images = args.p2_images or make_p2_samples(os.path.join(work, "p2_data"), args.samples)
                results += check_run(repo, "P2", p2_images, lambda d, out: [d, out, decoder],
                                     validate_json, work, timing, args.slowdown)
    results.append(check_python38(repo))
    return results


SAMPLES, SLOWDOWN = io_utils.Range(int, 2), io_utils.Range(float, 0, low_open=True)  # checked when parsed


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__[__doc__.index("Environment ("):])
    parser.add_argument("--repo", default=REPO_ROOT, help="repository to check (default: this one)")
    parser.add_argument("--checkpoint", help="P2 checkpoint (default: $HW3_P2_CKPT, else the cache)")
    parser.add_argument("--decoder-weights", help="the course's decoder_model.bin "
                        "(default: hw3_data/p2_data/decoder_model.bin in the repository, if there)")
    parser.add_argument("--p1-images", help="P1 image folder (default: generated)")
    parser.add_argument("--id2label", help="id2label.json for --p1-images (default: generated with them)")
    parser.add_argument("--p2-images", help="P2 image folder (default: generated)")
    parser.add_argument("--samples", type=SAMPLES, default=DEFAULT_SAMPLES,
                        help=f"images generated per problem when no folder is given, {SAMPLES} (default %(default)s)")
    parser.add_argument("--slowdown", type=SLOWDOWN, default=1.0,
                        help=f"factor on the measured times to estimate the graders' RTX 2080 Ti, {SLOWDOWN} (default "
                             "%(default)s: this GPU's times; 18 is conservative from an H100, whose fp16 "
                             "tensor throughput is ~18x a 2080 Ti's)")
    parser.add_argument("--skip-run", action="store_true", help="do not run hw3_1.sh and hw3_2.sh")
    args = parser.parse_args(argv)
    if bool(args.p1_images) != bool(args.id2label):
        parser.error("--p1-images and --id2label go together")
    return args


@io_utils.reports_input_errors
def main(argv=None) -> int:
    io_utils.quiet_known_warnings()
    results = run_checks(parse_args(argv))
    for result in results:
        first, *rest = result.message.splitlines() or [""]
        print(f"{result.status:4s}  {result.name}: {first}")
        for line in rest:
            print("      " + line)
    failed = [r.name for r in results if r.status == "FAIL"]
    print(f"\n{len(failed)} check(s) FAILED: {', '.join(failed)}" if failed else "\nno check failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
