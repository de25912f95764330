"""Problem 2: choose the submitted run by validation CIDEr, from the result files alone.

    python3 p2_select.py [--results outputs] [--runs none adapter prefix lora] [--install PATH]

Reads, for every run, what the Makefile's report graph wrote into the results
folder: `p2_metrics_<run>.json` (p2_evaluate.py --metrics-out), `p2_ckpt_<run>.txt`
(the run's checkpoint path) and `p2_per_image_<run>.json` (p2_evaluate.py --per-image).
The run with the highest CIDEr wins (a tie goes to the run named first). It writes
where the rest of the workflow looks for the submitted model:

  RESULTS/p2_ckpt_best.txt       its checkpoint path (build_report.py's `best` run)
  RESULTS/p2_metrics_best.json   its scores, plus "run": its name
  RESULTS/p2_per_image.json      its per-image CLIPScores (top-1 / last-1 attention figures)
  --install PATH                 a copy of its checkpoint; default the cache's p2_checkpoint.pt,
                                 where hw3_download.sh installs it and hw3_2.sh and selfcheck.py
                                 read it when $HW3_P2_CKPT is unset

A missing or malformed file, or a CIDEr that is not a finite number, is an error
naming the file: the choice is never made on part of the runs. Before anything is
written, an output that would replace a file the choice read (a run's result files or
checkpoint, however spelled or linked) or another output is refused; --install may be
the chosen checkpoint itself (nothing is copied then).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

import file_io
import io_utils
from io_utils import InputError

RUNS = ("none", "adapter", "prefix", "lora")


def read_run(results: str, run: str) -> dict:
    """{run, cider, metrics, checkpoint, per_image} of one run; InputError naming a bad file."""
    metrics_path = os.path.join(results, f"p2_metrics_{run}.json")
    metrics = file_io.read_json(metrics_path, f"run {run!r}'s metrics")
    cider = metrics.get("cider") if isinstance(metrics, dict) else None
    if isinstance(cider, bool) or not isinstance(cider, (int, float)) or not math.isfinite(cider):
        raise InputError(f"{metrics_path}: 'cider' is {cider!r}, expected a finite number "
                         "(p2_evaluate.py --metrics-out writes it; was CIDEr skipped with --no-cider?)")
    ckpt_path = os.path.join(results, f"p2_ckpt_{run}.txt")
    checkpoint = file_io.read_text(ckpt_path, f"run {run!r}'s checkpoint path").strip()
    if not os.path.isfile(checkpoint):
        raise InputError(f"{ckpt_path} names {checkpoint!r}, which is not a file")
    return {"run": run, "cider": float(cider), "metrics": metrics, "checkpoint": checkpoint,
            "per_image": os.path.join(results, f"p2_per_image_{run}.json")}


def choose(results: str, runs) -> tuple:
    """(every run read, the run with the highest validation CIDEr: the first named on a tie)."""
    if not runs:
        raise InputError("no runs to choose from")
    if len(set(runs)) != len(runs):
        raise InputError(f"runs named twice: {list(runs)}")
    found = [read_run(results, run) for run in runs]
    for r in found:
        print(f"{r['run']:>8s}  CIDEr {r['cider']:.4f}  {r['checkpoint']}", file=sys.stderr)
    return found, max(found, key=lambda r: r["cider"])  # max keeps the first of equal keys


def outputs(results: str, install: str) -> dict:
    """What `record` writes, by what it is for."""
    return {"p2_per_image.json": os.path.join(results, "p2_per_image.json"),
            "p2_metrics_best.json": os.path.join(results, "p2_metrics_best.json"),
            "--install": install, "p2_ckpt_best.txt": os.path.join(results, "p2_ckpt_best.txt")}


def installs_in_place(best: dict, install: str) -> bool:
    """Whether --install is the chosen checkpoint itself (any spelling, a link): nothing to copy."""
    try:
        return os.path.samefile(install, best["checkpoint"])
    except OSError:
        return False


def check_outputs(found: list, best: dict, results: str, install: str) -> None:
    """Before anything is written: every output can be written and none replaces a file the choice
    read (a run's metrics, checkpoint path, per-image scores or checkpoint) or another output."""
    written = outputs(results, install)
    for label, path in written.items():
        try:
            file_io.check_output_path(path)
        except InputError as error:
            raise InputError(f"{label}: {error}") from None
    if installs_in_place(best, install):
        del written["--install"]
    inputs = {}
    for r in found:
        inputs.update({f"run {r['run']!r}'s metrics": os.path.join(results, f"p2_metrics_{r['run']}.json"),
                       f"run {r['run']!r}'s checkpoint path": os.path.join(results, f"p2_ckpt_{r['run']}.txt"),
                       f"run {r['run']!r}'s per-image scores": r["per_image"],
                       f"run {r['run']!r}'s checkpoint": r["checkpoint"]})
    file_io.check_outputs_spare_inputs(written, inputs)


def record(best: dict, results: str, install: str) -> None:
    """Write the best run where the report, hw3_2.sh and selfcheck.py look for it."""
    written = outputs(results, install)
    per_image = file_io.read_json(best["per_image"], f"run {best['run']!r}'s per-image scores")
    file_io.atomic_write_text(written["p2_per_image.json"], json.dumps(per_image, indent=1) + "\n")
    file_io.atomic_write_text(written["p2_metrics_best.json"],
                              json.dumps({**best["metrics"], "run": best["run"]}, indent=1) + "\n")
    if not installs_in_place(best, install):
        with file_io.atomic_output(install) as tmp:
            shutil.copyfile(best["checkpoint"], tmp)
    # last: its presence says the whole choice was recorded
    file_io.atomic_write_text(written["p2_ckpt_best.txt"], best["checkpoint"] + "\n")


@io_utils.reports_input_errors
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="outputs", help="folder of the result files (default %(default)s)")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), help="runs to choose from (default: all four)")
    parser.add_argument("--install", default=io_utils.cache_dir(io_utils.P2_CHECKPOINT_NAME),
                        help="where the chosen checkpoint is copied (default: the cache's, %(default)s)")
    args = parser.parse_args(argv)
    found, best = choose(args.results, args.runs)
    check_outputs(found, best, args.results, args.install)
    record(best, args.results, args.install)
    print(f"best run: {best['run']} (validation CIDEr {best['cider']:.4f}); {best['checkpoint']} -> {args.install}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
