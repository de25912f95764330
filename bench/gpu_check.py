"""One prepared check of the GPU paths (issue 13): the benchmarks and a CUDA smoke run, one JSON.

Run through `bench/gpu_check.sh` (which first installs carried wheels); this is its driver.

    python3 bench/gpu_check.py --out DIR            # on a GPU machine: full sizes, about 5 minutes on an H200
    python3 bench/gpu_check.py --small --out DIR    # toy sizes on the CPU: does every step still run?

Sections, each run as its own process (the real command lines) with a time cap, the first three
being the benchmarks in this folder with their own flags:

  smoke         the real workflow on tiny models: p2_train.py for 20 cross-entropy steps (fp16
                autocast + GradScaler on CUDA) and 3 SCST steps with the feature cache, then
                `bash hw3_2.sh` (CUDA when there is one), then `p2_evaluate.py --no-cider` with a
                tiny CLIP (fp16 on CUDA); checks: every logged loss finite, a checkpoint that
                `load_checkpoint` rebuilds, a caption for every image, finite CLIPScore;
  p2_inference  bench_p2_inference.py: 1404 worst-case images (every caption to max_len), beam 5,
                with its time per phase; the same run with eager decoding steps, whose captions
                must equal the CUDA-graph run's; `bash hw3_2.sh` timed as a process of its own;
  p1            bench_p1.py: 2500 images, both full-size CLIPs, flip; `bash hw3_1.sh` timed too;
  p2_train      bench_p2_train.py: every preset with and without the feature cache under an 11 GB
                memory fraction, and the SCST step;
  load          bench_load.py: building the full-size encoder from its weights file against
                reading the file, on this machine's CPU;
  decode        bench_decode.py: the full-size decoder's beam search over 1404 images' random
                image tokens in one batch, eager and as a CUDA graph (captions must be equal),
                and the operations that take a step's GPU time; with --decoder-before FILE also
                that decoder.py's search on the same inputs (captions must be equal).

Writes DIR/gpu_check.json ({"sections": {name: {ok, error, problems, seconds, command, result}}})
and DIR/gpu_check.log (every section's output), and prints a summary. Where a target of
issues 13 and 23 applies (CUDA only), `targets` says whether it was met. With --small the numbers
mean nothing: it checks that the script and the benchmarks it drives have not rotted.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
sys.path.insert(0, REPO)

SECTIONS = ("smoke", "p2_inference", "p1", "p2_train", "load", "decode")
# Time caps per section (seconds), full size then --small; the whole run must end within 8 minutes on an H200.
CAPS = {"smoke": (150, 240), "p2_inference": (150, 240), "p1": (120, 120), "p2_train": (200, 300),
        "load": (120, 120), "decode": (90, 120)}
# issues 13 and 23, H100-class GPU: seconds in process (model load included) and as the graders' process
TARGETS = {"p2_inference_s": 5.0, "p2_process_s": 5.0, "p1_s": 8.0, "p1_process_s": 8.0, "train_peak_gib": 10.0,
           "encoder_build_over_read": 1.5}

# The test suite's toy sizes (tests/conftest.py)
TINY_VIT = "vit_tiny_patch16_224"
TINY_VIT_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
TINY_CLIP = {"embed_dim": 64, "image_resolution": 32, "vision_layers": 2, "vision_width": 64,
             "vision_patch_size": 8, "context_length": 77, "vocab_size": 49408,
             "transformer_width": 64, "transformer_heads": 1, "transformer_layers": 2}


class Log:
    """Every section's output, in one file."""

    def __init__(self, path: str):
        self.path = path
        open(path, "w").close()

    def write(self, title: str, text: str) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"\n===== {title} =====\n{text}\n")


def run(cmd: list, timeout: float, log: Log, title: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """cmd in the repository root with a time cap; its output goes to the log. Raises on failure."""
    start = time.perf_counter()
    try:
        result = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                                timeout=max(1.0, timeout), check=False)
    except subprocess.TimeoutExpired as error:
        out = (error.stdout or b"").decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        err = (error.stderr or b"").decode() if isinstance(error.stderr, bytes) else (error.stderr or "")
        log.write(f"{title} (timed out after {timeout:.0f} s)", out + err)
        raise RuntimeError(f"{title}: timed out after {timeout:.0f} s") from None
    log.write(f"{title} (rc {result.returncode}, {time.perf_counter() - start:.1f} s): {' '.join(cmd)}",
              result.stdout + result.stderr)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{title}: exit code {result.returncode}: {' | '.join(tail)}")
    return result


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# -- the benchmarks ---------------------------------------------------------------------------


def bench_command(name: str, small: bool, cuda: bool, out_json: str, decoder_before: str | None = None) -> list:
    py = sys.executable
    if name == "load":
        return [py, os.path.join(BENCH, "bench_load.py"), *(["--small"] if small else []), "--out-json", out_json]
    if name == "decode":
        sizes = ["--images", "2", "--steps", "1"] if small else ["--images", "1404"]
        return [py, os.path.join(BENCH, "bench_decode.py"), *sizes, "--device", "cuda" if cuda else "cpu",
                *(["--compare", decoder_before] if decoder_before else []), "--out-json", out_json]
    if name == "p1":
        return [py, os.path.join(BENCH, "bench_p1.py"), "--n-images", "8" if small else "2500",
                *(["--small"] if small else []), "--out-json", out_json]
    if name == "p2_inference":
        sizes = ["--small", "--n-images", "4", "--naive-images", "2"] if small else ["--n-images", "1404",
                                                                               "--naive-images", "10"]
        return [py, os.path.join(BENCH, "bench_p2_inference.py"), *sizes, "--out-json", out_json]
    return [py, os.path.join(BENCH, "bench_p2_train.py"), *(["--small", "--steps", "1"] if small else []),
            "--device", "cuda" if cuda else "cpu", "--out-json", out_json]


def bench_problems(name: str, result: dict) -> list:
    """What a benchmark's JSON records as failed (it goes on after a failed setting)."""
    if name == "p2_inference" and result.get("graph_equals_eager") is False:
        return [f"captions with CUDA graphs differ from eager decoding, e.g. {result['graph_differs_from_eager']}"]
    if name == "decode":
        problems = []
        if result.get("graph_captured") is False:
            problems.append("bench_decode: the step was not captured as a CUDA graph (graph and eager both ran "
                            "eagerly)")
        if result.get("graph_equals_eager") is False:
            problems.append("bench_decode: captions with a CUDA graph differ from eager decoding")
        if result.get("compare", {}).get("captions_equal") is False:
            problems.append(f"bench_decode: captions differ from {result['compare']['decoder']}'s")
        return problems
    if name != "p2_train":
        return []
    problems = []
    for r in result.get("results", []):
        where = f"{r['peft']}, {'with' if r['feature_cache'] else 'without'} the cache"
        if "out_of_memory" in r:
            problems.append(f"{where}: out of memory ({r['out_of_memory']})")
        if "error" in r.get("scst", {}):
            problems.append(f"{where}: SCST step failed ({r['scst']['error']})")
    return problems


# -- the smoke run ------------------------------------------------------------------------------


def tiny_files(folder: str) -> dict:
    """A synthetic set and tiny random models, saved as the real workflow reads them."""
    import timm
    import torch
    from clip.model import CLIP

    import synthetic
    from decoder import Decoder, DecoderConfig, gpt2_course_state

    torch.manual_seed(0)
    files = {"data_root": os.path.join(folder, "p2_data"), "vit": os.path.join(folder, "tiny_vit.pth"),
             "decoder": os.path.join(folder, "decoder_model.bin"), "clip": os.path.join(folder, "tiny_clip.pt")}
    synthetic.make_dataset(files["data_root"], n_train=40, n_val=10, image_size=32, seed=0)
    torch.save(timm.create_model(TINY_VIT, pretrained=False, **TINY_VIT_KWARGS).state_dict(), files["vit"])
    # a random 2-layer GPT-2 in the course's decoder_model.bin layout (Conv1D weights stored (in, out))
    gpt2 = Decoder(DecoderConfig(n_layer=2, n_embd=128, vocab_size=50257, n_ctx=64, encoder_width=64))
    with torch.no_grad():
        for p in gpt2.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    torch.save(gpt2_course_state(gpt2.state_dict()), files["decoder"])
    torch.save(CLIP(**TINY_CLIP).state_dict(), files["clip"])
    return files


def smoke(small: bool, cuda: bool, folder: str, log: Log, deadline: float) -> dict:
    import torch

    from captioner import load_checkpoint

    files = tiny_files(folder)
    out = os.path.join(folder, "run", "adapter.pt")
    steps, scst_steps = (4, 1) if small else (20, 3)
    train = [sys.executable, "p2_train.py", "--data-root", files["data_root"], "--decoder-weights", files["decoder"],
             "--out", out, "--encoder", TINY_VIT, "--encoder-weights", files["vit"],
             "--encoder-kwargs", json.dumps(TINY_VIT_KWARGS), "--device", "cuda" if cuda else "cpu",
             "--peft", "adapter", "--adapter-dim", "16", "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "2",
             "--max-steps", str(steps + scst_steps), "--scst-max-steps", str(scst_steps), "--scst-batch-size", "4",
             "--scst-samples", "2", "--max-len", "12", "--log-every", "1", "--val-every", str(steps // 2),
             "--cache-features", os.path.join(folder, "features"), "--decode-beams", "1", "3",
             "--decode-length-penalties", "0", "--workers", "0" if small else "2"]
    run(train, deadline - time.time(), log, "smoke: p2_train.py")
    with open(out + ".log.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    xe = [r for r in records if r.get("phase") == "xe" and "loss" in r]
    scst = [r for r in records if r.get("phase") == "scst" and "loss" in r]
    losses = [r["loss"] for r in xe + scst]
    if len(xe) != steps or len(scst) != scst_steps:
        raise RuntimeError(f"logged {len(xe)} cross-entropy and {len(scst)} SCST steps, expected {steps} and {scst_steps}")
    if not all(math.isfinite(v) for v in losses):
        raise RuntimeError(f"non-finite losses: {losses}")
    # GradScaler skips a step whose gradients overflowed; clip_grad_norm_ reports it as inf / NaN
    skipped = sum(not math.isfinite(r["grad_norm"]) for r in xe + scst)
    state = torch.load(out + ".state", map_location="cpu")
    model = load_checkpoint(out, files["decoder"], files["vit"])  # rebuilds and checks the saved tensors
    result = {"xe_steps": len(xe), "scst_steps": len(scst), "first_loss": round(xe[0]["loss"], 4),
              "last_xe_loss": round(xe[-1]["loss"], 4), "skipped_steps": skipped,
              "grad_scaler_scale": state["scaler"].get("scale"), "amp": cuda,
              "checkpoint_generation": model.config["generation"]}
    if skipped >= len(xe):
        raise RuntimeError(f"GradScaler skipped every step ({skipped}): the fp16 gradients always overflow")

    images = os.path.join(files["data_root"], "images", "val")
    preds = os.path.join(folder, "out", "pred.json")
    env = {"HW3_P2_CKPT": out, "HW3_P2_ENCODER_WEIGHTS": files["vit"]}
    run(["bash", "hw3_2.sh", images, preds, files["decoder"]], deadline - time.time(), log, "smoke: hw3_2.sh", env)
    captions = read_json(preds)
    expected = {os.path.splitext(n)[0] for n in os.listdir(images)}
    if set(captions) != expected or not all(isinstance(c, str) and c.strip() for c in captions.values()):
        raise RuntimeError(f"hw3_2.sh wrote {len(captions)} captions for {len(expected)} images, or an empty one")
    result["captions"] = len(captions)
    result["caption_example"] = captions[sorted(captions)[0]]

    metrics = os.path.join(folder, "out", "metrics.json")
    run([sys.executable, "p2_evaluate.py", "--pred_file", preds, "--images_root", images,
         "--annotation_file", os.path.join(files["data_root"], "val.json"), "--clip-model", files["clip"],
         "--no-cider", "--metrics-out", metrics, "--workers", "0"], deadline - time.time(), log,
        "smoke: p2_evaluate.py --no-cider")
    scores = read_json(metrics)
    if scores.get("n_images") != len(captions) or not math.isfinite(scores.get("clipscore") or float("nan")):
        raise RuntimeError(f"p2_evaluate.py wrote {scores}")
    result["clipscore_tiny_clip"] = round(scores["clipscore"], 4)
    return result


# -- the run ------------------------------------------------------------------------------------


def targets(sections: dict) -> dict:
    """Issue 13's targets, where the section ran (meaningful on an H100-class GPU only)."""
    def result(name):
        s = sections.get(name, {})
        return s.get("result") if s.get("ok") else None

    found = {}
    measured = {"p2_inference_s": ("p2_inference", "seconds"), "p2_process_s": ("p2_inference", "process_seconds"),
                "p1_s": ("p1", "seconds"), "p1_process_s": ("p1", "process_seconds")}
    for target, (section, key) in measured.items():
        if result(section) and result(section).get(key) is not None:
            found[target] = {"target": TARGETS[target], "measured": result(section)[key]}
    if result("load"):
        ratios = [r["build_over_read"] for r in result("load")["results"].values()]
        found["encoder_build_over_read"] = {"target": TARGETS["encoder_build_over_read"], "measured": max(ratios)}
    train = (sections.get("p2_train") or {}).get("result")  # a setting out of memory is a finding, not a crash
    if train:
        runs = train["results"]
        peaks = [r["xe"]["peak_reserved_gib"] for r in runs if "peak_reserved_gib" in r.get("xe", {})]
        failed = [f"{r['peft']} (cache {r['feature_cache']})" for r in runs if "out_of_memory" in r]
        if peaks or failed:
            found["train_peak_gib"] = {"target": TARGETS["train_peak_gib"], "measured": max(peaks, default=None),
                                       "out_of_memory": failed}
    for entry in found.values():
        entry["met"] = (entry["measured"] is not None and entry["measured"] <= entry["target"]
                        and not entry.get("out_of_memory"))
    return found


def summary_lines(report: dict) -> list:
    lines = [f"gpu_check ({'--small, numbers meaningless' if report['small'] else 'full size'}) on {report['device']}, "
             f"torch {report['torch']}, {report['date']}, {report['seconds']} s"]
    for name, s in report["sections"].items():
        status = "ok" if s["ok"] else f"FAILED: {s['error']}"
        lines.append(f"  {name:13s} {s.get('seconds', 0):7.1f} s  {status}")
        r = s.get("result") or {}
        if name == "p1" and r:
            lines.append(f"      {r['n_images']} images in {r['seconds']} s ({r['images_per_s']}/s), peak {r['peak_gpu_mb']} MB;"
                         f" bash hw3_1.sh {r.get('process_seconds')} s")
            profile, process = r.get("profile") or {}, r.get("process_profile") or {}
            lines.append(f"      phases {profile.get('seconds')}, batch {profile.get('batch')}; "
                         f"as a process {process.get('seconds')}")
        if name == "p2_inference" and r:
            lines.append(f"      {r['n_images']} images in {r['seconds']} s, peak {r['peak_gpu_mb']} MB, naive "
                         f"{r['naive_seconds_for_n_images']} s: speed-up {r['speedup']}x; bash hw3_2.sh "
                         f"{r.get('process_seconds')} s")
            profile = r.get("profile", {})
            lines.append(f"      phases {profile.get('seconds')}, batch {profile.get('batch')}, CUDA graph "
                         f"{profile.get('cuda_graph')}; eager {r.get('eager_seconds')} s, captions equal: "
                         f"{r.get('graph_equals_eager')}; warm {r.get('warm_seconds')} s {r.get('warm_profile')}")
            lines.append(f"      a new process's start-up: {r.get('startup_profile')}; its phases "
                         f"{r.get('process_profile')}")
        if name == "load" and r:
            for dtype, x in r["results"].items():
                lines.append(f"      {dtype}: read {x['read_s']} s, build {x['build_s']} s ({x['build_over_read']}x; "
                             f"before issue 23 {x['before_s']} s, {x['before_over_read']}x)")
        if name == "decode" and r:
            lines.append(f"      {r['images']} images x {r['beams']} beams, {r['steps']} steps: eager {r['search_s']} s "
                         f"({r['per_step_ms']} ms/step), CUDA graph {r.get('graph_capture_s')} s with the capture, "
                         f"{r.get('graph_warm_s')} s warm; captions equal: {r.get('graph_equals_eager')}")
            if r.get("compare"):
                c = r["compare"]
                lines.append(f"      {c['decoder']}: {c['search_s']} s ({c['per_step_ms']} ms/step), captions equal: "
                             f"{c['captions_equal']}")
            for op in r["top_ops"][:5]:
                lines.append(f"      {op['ms_per_step']:8.2f} ms/step {op['op']} {op['shapes'][:70]}")
        if name == "p2_train" and r:
            for x in r["results"]:
                xe, scst = x.get("xe", {}), x.get("scst", {})
                lines.append(f"      {x['peft']:8s} cache {'yes' if x['feature_cache'] else 'no '}: "
                             + ("out of memory" if "out_of_memory" in x else
                                f"peak reserved {xe.get('peak_reserved_gib', '-')} GiB, step {xe.get('step_s')} s"
                                + (f", SCST step {scst.get('step_s', scst.get('error'))}" if scst else "")))
        if name == "smoke" and r:
            lines.append(f"      {r['xe_steps']} + {r['scst_steps']} steps, loss {r['first_loss']} -> "
                         f"{r['last_xe_loss']}, {r['skipped_steps']} skipped by GradScaler, {r['captions']} captions, "
                         f"CLIPScore (tiny CLIP) {r['clipscore_tiny_clip']}")
        for problem in s.get("problems", []):
            lines.append(f"      problem: {problem}")
    for name, t in report.get("targets", {}).items():
        lines.append(f"  target {name}: {t['measured']} vs {t['target']}: {'met' if t['met'] else 'MISSED'}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.log")
    parser.add_argument("--small", action="store_true", help="toy sizes on the CPU (checks that it runs)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="the parts to run, in this order (default: all)")
    parser.add_argument("--budget-s", type=float, default=470.0,
                        help="the whole run's time; a section gets the smaller of its cap and what is left (470)")
    parser.add_argument("--decoder-before", metavar="FILE",
                        help="an earlier decoder.py for the decode section to time and compare captions with "
                             "(e.g. `git show 9a9847f:decoder.py > bench/decoder_before.py`, carried; default: none)")
    args = parser.parse_args(argv)
    if args.decoder_before and not os.path.isfile(args.decoder_before):
        parser.error(f"argument --decoder-before: {args.decoder_before!r} is not a file")
    if args.decoder_before:
        args.decoder_before = os.path.abspath(args.decoder_before)

    import torch

    cuda = torch.cuda.is_available() and not args.small
    if not args.small and not cuda:
        print("warning: no CUDA device: the full-size run on the CPU measures nothing useful; use --small",
              file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "gpu_check.log"))
    start = time.time()
    env = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    os.environ.update(env)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "small": args.small,
              "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
              "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
              "python": platform.python_version(), "sections": {}}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for name in args.sections:
            section_start = time.time()
            cap = CAPS[name][1 if args.small else 0]
            deadline = section_start + min(cap, args.budget_s - (section_start - start))
            section = {"ok": False, "error": None, "problems": []}
            print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
            try:
                if deadline - section_start < 10:
                    raise RuntimeError("skipped: the time budget is spent")
                if name == "smoke":
                    section["result"] = smoke(args.small, cuda, os.path.join(tmp, "smoke"), log, deadline)
                else:
                    out_json = os.path.join(tmp, name + ".json")
                    command = bench_command(name, args.small, cuda, out_json, args.decoder_before)
                    section["command"] = " ".join(command).replace(out_json, "OUT.json")
                    run(command, deadline - time.time(), log, name)
                    section["result"] = read_json(out_json)
                    section["problems"] = bench_problems(name, section["result"])
                section["ok"] = not section["problems"]
            except Exception as error:  # noqa: BLE001 -- recorded; the other sections still run
                section["error"] = f"{type(error).__name__}: {error}"
            section["seconds"] = round(time.time() - section_start, 1)
            report["sections"][name] = section
    report["seconds"] = round(time.time() - start, 1)
    report["targets"] = targets(report["sections"]) if cuda else {}
    with open(os.path.join(args.out, "gpu_check.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print("\n".join(summary_lines(report)))
    return 0 if all(s["ok"] for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
