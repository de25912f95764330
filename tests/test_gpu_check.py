"""bench/gpu_check.sh --small: the GPU check's every section runs end to end on the CPU, so the
script waiting for a GPU machine cannot rot (issue 13). Its numbers are toy-size and mean nothing."""
import json
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_small_runs_every_section(tmp_path, bpe_dir):
    out = tmp_path / "check"
    # --decoder-before: this repository's own decoder.py, so its captions must be equal
    result = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_check.sh"), "--small", "--out", str(out),
                             "--decoder-before", os.path.join(REPO, "decoder.py")],
                            cwd=REPO, env={**os.environ, "HW3_BPE_DIR": bpe_dir}, capture_output=True, text=True,
                            timeout=900, check=False)
    report = json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))
    sections = report["sections"]
    assert list(sections) == ["smoke", "p2_inference", "p1", "p2_train", "load", "decode"]
    for name, section in sections.items():
        assert section["ok"] and section["error"] is None and section["problems"] == [], (name, section)
    assert result.returncode == 0, result.stderr[-3000:]
    assert report["small"] and report["targets"] == {}  # no target is judged on toy sizes

    smoke = sections["smoke"]["result"]
    assert smoke["xe_steps"] == 4 and smoke["scst_steps"] == 1 and smoke["captions"] == 10
    p2 = sections["p2_inference"]["result"]
    assert p2["n_images"] == 4 and p2["graph_equals_eager"] is True and p2["process_seconds"] > 0
    assert set(p2["profile"]["seconds"]) == {"load", "read", "encode", "decode", "text", "write"}
    assert set(p2["process_profile"]) == set(p2["profile"]["seconds"])  # the process's phases, beside its total
    p1 = sections["p1"]["result"]
    assert p1["process_seconds"] > 0
    assert set(p1["profile"]["seconds"]) == set(p1["process_profile"]["seconds"]) == {
        "load", "text", "read", "encode", "write"}
    assert set(sections["load"]["result"]["results"]) == {"fp32", "fp16"}
    decode = sections["decode"]["result"]
    assert decode["images"] == 2 and decode["steps"] >= 1 and decode["top_ops"][0]["ms_per_step"] > 0
    assert decode["compare"]["captions_equal"] is True and decode["compare"]["search_s"] > 0
    assert sections["p1"]["result"]["n_images"] == 8
    train = sections["p2_train"]["result"]["results"]
    assert {(r["peft"], r["feature_cache"]) for r in train} == {
        (p, c) for p in ("none", "adapter", "prefix", "lora") for c in (True, False)}
    assert all("scst" in r and "step_s" in r["scst"] for r in train if r["feature_cache"])
    # the summary names every section
    assert all(name in result.stdout for name in sections)
    assert (out / "gpu_check.log").stat().st_size > 0


def test_targets_are_judged_from_the_measurements_and_out_of_memory_misses():
    import sys

    sys.path.insert(0, os.path.join(REPO, "bench"))
    import gpu_check

    sections = {
        "p1": {"ok": True, "result": {"seconds": 7.5, "process_seconds": 9.0}},
        "p2_inference": {"ok": True, "result": {"seconds": 5.5, "process_seconds": None}},
        "p2_train": {"ok": False, "result": {"results": [
            {"peft": "none", "feature_cache": True, "xe": {"peak_reserved_gib": 9.5}},
            {"peft": "lora", "feature_cache": False, "out_of_memory": "CUDA out of memory"}]}},
        "load": {"ok": True, "result": {"results": {"fp32": {"build_over_read": 1.2},
                                                    "fp16": {"build_over_read": 1.7}}}},
    }
    found = gpu_check.targets(sections)
    assert found["p1_s"] == {"target": 8.0, "measured": 7.5, "met": True}
    assert found["p1_process_s"]["met"] is False  # 9 s > 8 s
    assert found["p2_inference_s"]["met"] is False  # 5.5 s > 5 s
    assert "p2_process_s" not in found  # not measured: no verdict
    assert found["encoder_build_over_read"] == {"target": 1.5, "measured": 1.7, "met": False}  # the worse file
    assert found["train_peak_gib"]["measured"] == 9.5 and found["train_peak_gib"]["met"] is False
    sections["p2_train"]["result"]["results"].pop()
    assert gpu_check.targets(sections)["train_peak_gib"]["met"] is True


def test_a_decoder_whose_captions_differ_is_a_problem():
    import sys

    sys.path.insert(0, os.path.join(REPO, "bench"))
    import gpu_check

    command = gpu_check.bench_command("decode", False, True, "out.json", "/x/old_decoder.py")
    assert command[command.index("--compare") + 1] == "/x/old_decoder.py" and "1404" in command
    assert "--compare" not in gpu_check.bench_command("decode", False, True, "out.json")
    same = {"graph_captured": True, "graph_equals_eager": True,
            "compare": {"decoder": "/x/old_decoder.py", "captions_equal": True}}
    assert gpu_check.bench_problems("decode", same) == []
    assert gpu_check.bench_problems("decode", {**same, "graph_captured": False}) == [
        "bench_decode: the step was not captured as a CUDA graph (graph and eager both ran eagerly)"]
    differ = {"graph_equals_eager": False, "compare": {"decoder": "/x/old_decoder.py", "captions_equal": False}}
    assert gpu_check.bench_problems("decode", differ) == [
        "bench_decode: captions with a CUDA graph differ from eager decoding",
        "bench_decode: captions differ from /x/old_decoder.py's"]
