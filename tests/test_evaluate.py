"""p2_evaluate.py end to end (a subprocess, as a student runs it) on a toy set.

The CLIP is the tiny random one from conftest; the expected numbers are
computed here independently: CIDEr by calling pycocoevalcap directly, CLIPScore
by encoding each image and caption with the same CLIP one at a time.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import disk_full
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG_CAPTION = " ".join(["a red bus parked next to a tall building"] * 25)  # 200 words

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="CIDEr needs Java")

# key -> (file on disk, PIL mode, references)
IMAGES = {
    "000000060623": ("000000060623.jpg", "RGB", ["a man riding a bike down the street .",
                                                 "A man rides his bicycle on a city street.",
                                                 "a person on a bike next to cars"]),
    "2988244398": ("2988244398.png", "RGB", [" A dog runs through the grass .",
                                             " A brown dog is running outside ."]),
    "gray.v2": ("gray.v2.jpg", "L", ["a black and white photo of a cat on a couch",
                                     "A cat sleeping on a sofa.", "a cat lying on a couch",
                                     "an old photo of a cat", "a cat on the couch ."]),
    "000000000009": ("000000000009.JPEG", "RGB", ["a plate of food with broccoli and rice",
                                                  "A meal of rice, broccoli and meat."]),
    "bus": ("bus.png", "RGB", ["a red bus parked next to a building", "a bus on the street"]),
}
PREDICTIONS = {
    "000000060623": "a man riding a bike on a street",
    "2988244398": "a dog running on the grass",
    "gray.v2": "a cat on a couch",
    "000000000009": "a plate of food with broccoli",
    "bus": LONG_CAPTION,
}


@pytest.fixture
def dataset(tmp_path):
    """Images (mixed extensions, one grayscale), a course annotation file, predictions."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    root.mkdir()
    annotation = {"images": [], "annotations": []}
    for image_id, (key, (name, mode, refs)) in enumerate(IMAGES.items(), start=1):
        channels = 1 if mode == "L" else 3
        pixels = rng.integers(0, 256, size=(40 + image_id, 48, channels), dtype=np.uint8)
        Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(root / name)
        # the course's file names always end in .jpg, whatever the file on disk
        annotation["images"].append({"file_name": key + ".jpg", "id": image_id})
        for caption in refs:
            annotation["annotations"].append({"caption": caption, "image_id": image_id,
                                              "id": len(annotation["annotations"])})
    ann_file = tmp_path / "val.json"
    ann_file.write_text(json.dumps(annotation))
    pred_file = tmp_path / "pred.json"
    pred_file.write_text(json.dumps(PREDICTIONS))
    return {"root": root, "ann": ann_file, "pred": pred_file, "tmp": tmp_path}


def run_evaluate(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(REPO, "p2_evaluate.py"), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300, check=False)


def expected_cider(refs, preds):
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": preds[k]}] for k in refs})
    return Cider().compute_score(gts, res)[0]


def clip_tokens_cut_at_a_word(caption):
    """clip.tokenize of the longest word prefix of `caption` that it accepts."""
    import clip

    words = caption.split(" ")
    for n in range(len(words), 0, -1):
        try:
            return clip.tokenize(" ".join(words[:n]))
        except RuntimeError:  # too long for the context
            continue
    raise AssertionError(f"not even the first word of {caption!r} fits")


def test_long_captions_are_cut_at_a_word_as_inference_cuts_them():
    import clip
    import torch

    from clipscore import clip_text_tokens

    fits = " ".join(["word"] * 74)  # 74 tokens + start and end: one short of the context
    tokens = clip_text_tokens([fits + " antidisestablishmentarianism", fits], 77)
    assert torch.equal(tokens, clip.tokenize([fits, fits]))  # the long last word goes whole


def expected_clip_scores(model_file, root, preds):
    """The course's per-image CLIPScore, one image at a time, long text cut at a word boundary."""
    import clip
    import torch

    model, preprocess = clip.load(model_file, device="cpu", jit=False)
    scores = {}
    with torch.no_grad():
        for key, caption in preds.items():
            name = IMAGES[key][0]
            image = preprocess(Image.open(root / name).convert("RGB")).unsqueeze(0)
            text = clip_tokens_cut_at_a_word(caption)
            cos = torch.nn.functional.cosine_similarity(model.encode_image(image), model.encode_text(text))
            scores[key] = 2.5 * max(cos.item(), 0.0)
    return scores


@needs_java
def test_end_to_end_scores_equal_direct_computation(dataset, tiny_clip_file):
    per_image = dataset["tmp"] / "out" / "per_image.json"
    proc = run_evaluate("--pred_file", dataset["pred"], "--images_root", dataset["root"],
                        "--annotation_file", dataset["ann"], "--clip-model", tiny_clip_file,
                        "--per-image", per_image, "--device", "cpu", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    match = re.fullmatch(r"CIDEr: (\d+\.\d{4,}) \| CLIPScore: (\d+\.\d{4,})", proc.stdout.strip())
    assert match, proc.stdout

    refs = {k: v[2] for k, v in IMAGES.items()}
    cider = expected_cider(refs, PREDICTIONS)
    assert cider > 0.1
    assert match.group(1) == f"{cider:.6f}"

    direct = expected_clip_scores(tiny_clip_file, dataset["root"], PREDICTIONS)
    assert any(s > 0 for s in direct.values())  # a random CLIP still gives some positive cosines
    assert float(match.group(2)) == pytest.approx(np.mean(list(direct.values())), abs=1e-4)
    assert "1 caption(s) longer than CLIP's 77-token context were truncated" in proc.stderr
    assert ("the images of 3 key(s) ['000000000009', '2988244398', 'bus'] are not named <key>.jpg: "
            "the course's scorer opens <key>.jpg only") in proc.stderr

    rows = json.loads(per_image.read_text())
    assert [r["key"] for r in rows] == sorted(direct, key=lambda k: -direct[k])
    assert all(rows[i]["clip_score"] >= rows[i + 1]["clip_score"] for i in range(len(rows) - 1))
    for row in rows:
        assert row["caption"] == PREDICTIONS[row["key"]]
        assert row["clip_score"] == pytest.approx(direct[row["key"]], abs=1e-4)


@needs_java
def test_metrics_out_holds_the_printed_scores(dataset):
    """--metrics-out (what build_report.py reads): the scores as numbers, null for a skipped one."""
    metrics_file = dataset["tmp"] / "new" / "metrics.json"
    proc = run_evaluate("--pred_file", dataset["pred"], "--annotation_file", dataset["ann"],
                        "--no-clipscore", "--metrics-out", metrics_file)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(metrics_file.read_text())
    assert proc.stdout.strip() == f"CIDEr: {metrics['cider']:.6f}"
    assert metrics == {"cider": pytest.approx(expected_cider({k: v[2] for k, v in IMAGES.items()}, PREDICTIONS),
                                              abs=1e-12),
                       "clipscore": None, "n_images": len(PREDICTIONS),
                       "pred_file": str(dataset["pred"]), "annotation_file": str(dataset["ann"])}
    assert os.listdir(metrics_file.parent) == ["metrics.json"]  # no temporary file left


def test_in_process_functions(dataset, tiny_clip_file):
    import p2_evaluate

    refs = p2_evaluate.load_references(str(dataset["ann"]))
    assert refs == {k: v[2] for k, v in IMAGES.items()}
    paths = p2_evaluate.find_images(str(dataset["root"]), refs)
    assert {k: os.path.basename(p) for k, p in paths.items()} == {k: v[0] for k, v in IMAGES.items()}

    short = {k: v for k, v in PREDICTIONS.items() if k != "bus"}
    scores = p2_evaluate.clip_scores(short, str(dataset["root"]), tiny_clip_file, device="cpu", batch_size=3)
    direct = expected_clip_scores(tiny_clip_file, dataset["root"], short)
    assert set(scores) == set(short)
    for key in short:
        assert scores[key] == pytest.approx(direct[key], abs=1e-4)


@needs_java
def test_cider_pycoco_returns_mean_and_per_key(dataset):
    import p2_evaluate

    refs = p2_evaluate.load_references(str(dataset["ann"]))
    mean, per_key = p2_evaluate.cider_pycoco(PREDICTIONS, refs)
    assert set(per_key) == set(refs)
    assert mean == pytest.approx(expected_cider(refs, PREDICTIONS), abs=1e-12)
    assert mean == pytest.approx(np.mean(list(per_key.values())), abs=1e-12)
    # a line break inside a caption must not shift the other captions
    broken = dict(PREDICTIONS, bus="a red bus\rparked\u2028next to a building")
    clean = dict(PREDICTIONS, bus="a red bus parked next to a building")
    assert p2_evaluate.cider_pycoco(broken, refs)[1] == p2_evaluate.cider_pycoco(clean, refs)[1]


def test_image_found_whatever_its_extension_prefers_jpg(tmp_path):
    import p2_evaluate

    for name in ("a.png", "a.jpg", "b.JPEG", "c.d.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    paths = p2_evaluate.find_images(str(tmp_path), ["a", "b", "c.d"])
    assert {k: os.path.basename(p) for k, p in paths.items()} == {"a": "a.jpg", "b": "b.JPEG", "c.d": "c.d.png"}


# ---------------------------------------------------------------------------
# errors: non-zero exit, a message that names the problem
# ---------------------------------------------------------------------------


def test_key_mismatch_reports_counts_and_examples(dataset):
    preds = dict(PREDICTIONS)
    del preds["bus"], preds["gray.v2"]
    preds["000000099999"] = "an extra caption"
    dataset["pred"].write_text(json.dumps(preds))
    proc = run_evaluate("--pred_file", dataset["pred"], "--images_root", dataset["root"],
                        "--annotation_file", dataset["ann"])
    assert proc.returncode != 0
    assert "2 missing (e.g. ['bus', 'gray.v2'])" in proc.stderr
    assert "1 extra (e.g. ['000000099999'])" in proc.stderr


@pytest.mark.parametrize("annotation, message", [
    ({"images": []}, "missing the 'annotations' list"),
    ({"annotations": []}, "missing the 'images' list"),
    ([1, 2], "expected a JSON object"),
    ({"images": [{"file_name": "a.jpg", "id": 1}, {"file_name": "b.jpg", "id": 2}],
      "annotations": [{"caption": "x", "image_id": 1}]}, "1 image(s) have no caption, e.g. ['b']"),
    ({"images": [{"file_name": "a.jpg", "id": 1}],
      "annotations": [{"caption": "x", "image_id": 7}]}, "image_id 7, which is not in 'images'"),
    ({"images": [{"id": 1}], "annotations": []}, "images[0] must be an object with a string 'file_name'"),
])
def test_malformed_annotation_file(dataset, annotation, message):
    dataset["ann"].write_text(json.dumps(annotation))
    proc = run_evaluate("--pred_file", dataset["pred"], "--images_root", dataset["root"],
                        "--annotation_file", dataset["ann"])
    assert proc.returncode != 0
    assert message in proc.stderr


def test_annotation_file_not_json(dataset):
    dataset["ann"].write_text("{not json")
    proc = run_evaluate("--pred_file", dataset["pred"], "--images_root", dataset["root"],
                        "--annotation_file", dataset["ann"])
    assert proc.returncode != 0
    assert "is not valid JSON" in proc.stderr and "val.json" in proc.stderr


@pytest.mark.parametrize("content, message", [
    (["a caption"], "expected a JSON object {image name: caption}, got list"),
    ({"bus": 3}, "1 caption(s) are not strings, e.g. 'bus': 3"),
])
def test_prediction_file_must_map_names_to_strings(dataset, content, message):
    dataset["pred"].write_text(json.dumps(content))
    proc = run_evaluate("--pred_file", dataset["pred"], "--images_root", dataset["root"],
                        "--annotation_file", dataset["ann"])
    assert proc.returncode != 0
    assert message in proc.stderr


def test_missing_image_is_named(dataset):
    os.remove(dataset["root"] / "2988244398.png")
    proc = run_evaluate("--pred_file", dataset["pred"], "--images_root", dataset["root"],
                        "--annotation_file", dataset["ann"], "--no-cider")
    assert proc.returncode != 0
    assert "for 1 key(s), e.g. '2988244398'" in proc.stderr


def test_java_missing_is_explained(dataset, tmp_path):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = dict(os.environ, PATH=str(empty_bin))
    proc = run_evaluate("--pred_file", dataset["pred"], "--annotation_file", dataset["ann"],
                        "--no-clipscore", env=env)
    assert proc.returncode != 0
    assert "needs Java" in proc.stderr and "default-jre-headless" in proc.stderr


# ---------------------------------------------------------------------------
# checks before any work: a bad option fails before CIDEr and CLIPScore run
# ---------------------------------------------------------------------------


@pytest.fixture
def no_scoring(monkeypatch):
    """p2_evaluate with CIDEr and CLIPScore replaced by failures: a check that
    comes before them reports its error; one that comes after never runs."""
    import p2_evaluate

    def scored(*args, **kwargs):
        raise AssertionError("scoring started before the inputs were checked")

    monkeypatch.setattr(p2_evaluate, "cider_pycoco", scored)
    monkeypatch.setattr(p2_evaluate, "clip_scores", scored)
    monkeypatch.setattr(p2_evaluate, "check_java", lambda: None)
    return p2_evaluate


def _main_error(module, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        module.main([str(a) for a in argv])
    return str(exit_info.value.code)


def test_unknown_clip_model_fails_before_scoring(dataset, no_scoring):
    message = _main_error(no_scoring, ["--pred_file", dataset["pred"], "--images_root", dataset["root"],
                                       "--annotation_file", dataset["ann"], "--clip-model", "ViT-X/99"])
    assert "CLIP model 'ViT-X/99' not found; expected one of the models [" in message


def test_a_folder_as_clip_model_is_named_as_one(dataset, no_scoring):
    message = _main_error(no_scoring, ["--pred_file", dataset["pred"], "--images_root", dataset["root"],
                                       "--annotation_file", dataset["ann"], "--clip-model", dataset["tmp"]])
    assert f"CLIP model {str(dataset['tmp'])!r} is a folder; expected one of the models [" in message


@pytest.mark.parametrize("option", ["--metrics-out", "--per-image"])
def test_output_file_that_cannot_be_written_fails_before_scoring(dataset, no_scoring, option):
    args = ["--pred_file", dataset["pred"], "--images_root", dataset["root"], "--annotation_file", dataset["ann"]]
    folder = dataset["tmp"] / "a_folder"
    folder.mkdir()
    assert f"{option}: output path '{folder}' is a folder; expected a file name" in _main_error(no_scoring, args + [option, folder])

    under_file = dataset["pred"] / "sub" / "out.json"  # the prediction file is a file, not a folder
    message = _main_error(no_scoring, args + [option, under_file])
    assert f"{option}: cannot write '{under_file}': '{dataset['pred']}' is not a folder" in message


def test_repeated_prediction_keys_warn(tmp_path, capsys):
    import p2_evaluate

    pred = tmp_path / "pred.json"
    pred.write_text('{"a": "a dog", "b": {"x": 1, "x": 2}, "a": "a cat", "c": "x", "c": "y", "d": "z"}')
    with pytest.raises(p2_evaluate.InputError):  # b is not a caption; its inner repeat is not a key
        p2_evaluate.load_predictions(str(pred))
    assert "2 key(s) ['a', 'c'] more than once" in capsys.readouterr().err

    pred.write_text('{"a": "a dog", "b": "x", "a": "a cat"}')
    assert p2_evaluate.load_predictions(str(pred)) == {"a": "a cat", "b": "x"}
    err = capsys.readouterr().err
    assert "holds 1 key(s) ['a'] more than once" in err and "the score changes" in err

    for text in ('{"a": "a dog", "b": "x"}', '[{"a": 1, "a": 2}]'):  # no repeat; a list, not a prediction file
        pred.write_text(text)
        try:
            p2_evaluate.load_predictions(str(pred))
        except p2_evaluate.InputError:
            pass
        assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------
# warnings wherever the course's scorer gives another number
# ---------------------------------------------------------------------------


def _write_annotation(path, captions_by_name):
    annotation = {"images": [], "annotations": []}
    for image_id, (name, captions) in enumerate(captions_by_name.items(), start=1):
        annotation["images"].append({"file_name": name, "id": image_id})
        annotation["annotations"] += [{"caption": c, "image_id": image_id, "id": 10 * image_id + i}
                                      for i, c in enumerate(captions)]
    path.write_text(json.dumps(annotation))
    return str(path)


def test_warns_on_captions_the_course_scorer_splits_or_rewrites(tmp_path, capsys):
    import p2_evaluate

    ann = _write_annotation(tmp_path / "val.json", {
        "a.jpg": ["a dog _UNK on grass", "a dog"], "b.jpg": ["a cat\u2028on a mat", "a cat"],
        "c.jpg": ["a bus", "a red bus"], "d.jpg": ["a _unk is lower case", "a cow"]})
    refs = p2_evaluate.load_references(ann)
    preds = {"a": "a dog\ron grass", "b": "a cat", "c": "a bus\x0c", "d": "a cow"}
    p2_evaluate.warn_course_differences(preds, refs, ann, None)
    err = capsys.readouterr().err
    assert "the predictions of 2 key(s) ['a', 'c'] contain a line break other than \\n" in err
    assert "the references of 1 key(s) ['b'] contain a line break" in err
    assert "scores every later caption against the wrong image" in err
    assert "the references of 1 key(s) ['a'] contain '_UNK'" in err and "'_UNKNOWN' in references only" in err
    assert "keys an image" not in err  # every file name is <key>.jpg

    p2_evaluate.warn_course_differences({"c": "a bus", "d": "a cow"},
                                        {k: refs[k] for k in ("c", "d")}, ann, None)
    assert capsys.readouterr().err == ""
    p2_evaluate.warn_course_differences(preds, refs, ann, None, cider=False)  # only CIDEr reads captions
    assert capsys.readouterr().err == ""


def test_warns_on_file_names_the_course_scorer_keys_differently(tmp_path, capsys):
    import p2_evaluate

    ann = _write_annotation(tmp_path / "val.json", {
        "a.png": ["x"], "b.jpg.jpg": ["y"], "c.jpg": ["z"], "d.JPG": ["w"], "e.v2.jpg": ["v"]})
    assert p2_evaluate.course_keys(ann) == {"a": "a.png", "b.jpg": "b", "d": "d.JPG"}
    refs = p2_evaluate.load_references(ann)
    p2_evaluate.warn_course_differences({k: "x" for k in refs}, refs, ann, None)
    err = capsys.readouterr().err
    assert "3 image(s) get another key there (here 'a' there 'a.png', 'b.jpg' there 'b', 'd' there 'd.JPG')" in err


def _save_image(path, array):
    Image.fromarray(array).save(path)
    return str(path)


def test_warns_on_images_the_course_scorer_opens_or_converts_differently(tmp_path, capsys):
    import p2_evaluate

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((8, 8, 1), 255, np.uint8)], axis=-1)
    see_through = rgba.copy()
    see_through[:4, :, 3] = 0
    wide = rng.integers(0, 65536, size=(8, 8), dtype=np.uint16)
    palette = Image.fromarray(rgb).convert("P")
    palette.info["transparency"] = int(np.asarray(palette)[0, 0])
    palette.save(tmp_path / "palette.png", transparency=palette.info["transparency"])
    paths = {
        "plain": _save_image(tmp_path / "plain.jpg", rgb),
        "opaque": _save_image(tmp_path / "opaque.png", rgba),        # alpha, but nothing to composite
        "see_through": _save_image(tmp_path / "see_through.png", see_through),
        "wide": _save_image(tmp_path / "wide.png", wide),            # 16-bit grayscale
        "palette": str(tmp_path / "palette.png"),
    }
    assert Image.open(paths["wide"]).mode.startswith("I")
    assert [k for k in paths if p2_evaluate.converts_differently(paths[k])] == ["see_through", "wide", "palette"]

    ann = _write_annotation(tmp_path / "val.json", {k + ".jpg": ["x"] for k in paths})
    refs = p2_evaluate.load_references(ann)
    p2_evaluate.warn_course_differences({k: "x" for k in refs}, refs, ann, paths)
    err = capsys.readouterr().err
    assert "the images of 4 key(s) ['opaque', 'palette', 'see_through', 'wide'] are not named <key>.jpg" in err
    assert ("the images of 3 key(s) ['palette', 'see_through', 'wide'] have transparency or more than "
            "8 bits per channel") in err


def test_inference_captions_hold_no_line_break_the_course_scorer_splits(bpe_dir):
    """Our captions never trigger the line-break warning: the caption text of any
    GPT-2 token, or of text with every line break Java knows, has none."""
    from captioner import caption_text
    from p2_evaluate import _LINE_BREAKS
    from tokenizer import BPETokenizer

    tokenizer = BPETokenizer(os.path.join(bpe_dir, "encoder.json"), os.path.join(bpe_dir, "vocab.bpe"))
    breaks = "\n\r\x0b\x0c\u2028\u2029"
    a, b = tokenizer.encode("a"), tokenizer.encode("b")
    for ch in breaks:
        ids = tokenizer.encode(f"a{ch}b{ch}{ch} c{ch}")
        assert tokenizer.decode(ids) == f"a{ch}b{ch}{ch} c{ch}"  # the break survives decoding...
        assert caption_text(tokenizer, ids) == "a b c"            # ...but not the caption text
    texts = (caption_text(tokenizer, a + [i] + b) for i in range(len(tokenizer.encoder)))
    assert [t for t in texts if _LINE_BREAKS.search(t) or "\n" in t] == []


def test_course_warnings_come_before_scoring(dataset, no_scoring, capsys):
    dataset["pred"].write_text(json.dumps(dict(PREDICTIONS, bus="a red bus\u2029parked")))
    with pytest.raises(AssertionError, match="scoring started"):
        no_scoring.main([str(a) for a in ("--pred_file", dataset["pred"], "--annotation_file", dataset["ann"],
                                          "--no-clipscore")])
    assert "the predictions of 1 key(s) ['bus'] contain a line break" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# offline, and one metric failing
# ---------------------------------------------------------------------------


def test_clip_that_cannot_be_downloaded_fails_before_any_scoring(dataset, no_scoring, tmp_path, monkeypatch, capsys):
    """Offline, CLIP ViT-B/32 not in the cache: one clear line naming the fixes, before CIDEr runs
    (it used to end in a 68-line urllib traceback after CIDEr was computed and never printed)."""
    import urllib.error

    import clip_weights

    def offline(url, path):
        open(path, "wb").close()  # as a download that failed at once
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(clip_weights, "_download", offline)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HW3_CACHE", str(tmp_path / "empty_cache"))
    message = _main_error(no_scoring, ["--pred_file", dataset["pred"], "--images_root", dataset["root"],
                                       "--annotation_file", dataset["ann"], "--device", "cpu"])
    assert message.startswith("error: could not download CLIP ViT-B/32 from ") and "\n" not in message
    assert "Name or service not known" in message
    assert "hw3_cache.py clip ViT-B/32" in message and "hw3_download.sh" in message and "--clip-model" in message
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "empty_cache").exists()  # no .part file, no empty folder left


@pytest.mark.parametrize("case", ["code", "text", "archive with code"])
def test_a_clip_model_file_that_is_not_clip_weights_is_one_line_and_runs_nothing(
        case, dataset, no_scoring, tmp_path, tiny_clip_archive):
    """--clip-model FILE is read as data: a pickle that would run code, a text file and a TorchScript archive
    naming a function are each refused in one line before scoring, and nothing they name runs."""
    import os as os_module
    import zipfile

    import torch

    marker = tmp_path / "marker"
    path = tmp_path / "model.pt"
    if case == "code":
        class RunsCode:
            def __reduce__(self):
                return os_module.system, (f"touch '{marker}'",)
        torch.save({"visual.proj": torch.zeros(1), "x": RunsCode()}, path)
        expected = "it holds objects other than tensors and plain containers: "
    elif case == "text":
        path.write_text("ViT-B/32\n", encoding="utf-8")
        expected = "it is text starting with 'ViT-B/32'"
    else:  # OpenAI's format, its data.pkl rewritten to call os.system
        with zipfile.ZipFile(tiny_clip_archive) as source, zipfile.ZipFile(path, "w") as target:
            for item in source.infolist():
                data = source.read(item)
                if item.filename.endswith("/data.pkl"):
                    data = b"\x80\x02cos\nsystem\nq\x00X" + len(f"touch '{marker}'").to_bytes(4, "little") + \
                        f"touch '{marker}'".encode() + b"q\x01\x85q\x02Rq\x03."
                target.writestr(item, data)
        expected = "it is a TorchScript archive holding os.system"
    message = _main_error(no_scoring, ["--pred_file", dataset["pred"], "--images_root", dataset["root"],
                                       "--annotation_file", dataset["ann"], "--device", "cpu",
                                       "--clip-model", str(path)])
    assert message.startswith(f"error: '{path}' is not a CLIP checkpoint: ") and "\n" not in message, message
    assert expected in message, message
    assert not marker.exists()


def test_a_failing_metric_still_prints_and_saves_the_other(dataset, tiny_clip_file, monkeypatch, capsys):
    import p2_evaluate

    def java_fails(preds, refs):
        raise subprocess.CalledProcessError(1, ["java", "-cp", "stanford-corenlp-3.4.1.jar"])

    monkeypatch.setattr(p2_evaluate, "cider_pycoco", java_fails)
    metrics_file = dataset["tmp"] / "metrics.json"
    per_image = dataset["tmp"] / "per_image.json"
    with pytest.raises(SystemExit) as stop:
        p2_evaluate.main([str(a) for a in ("--pred_file", dataset["pred"], "--images_root", dataset["root"],
                                           "--annotation_file", dataset["ann"], "--clip-model", tiny_clip_file,
                                           "--device", "cpu", "--metrics-out", metrics_file,
                                           "--per-image", per_image)])
    assert str(stop.value.code).startswith("error: CIDEr failed: CalledProcessError: Command '['java'")
    printed = capsys.readouterr().out.strip()
    match = re.fullmatch(r"CIDEr: failed \| CLIPScore: (\d+\.\d{6})", printed)
    assert match, printed
    metrics = json.loads(metrics_file.read_text())
    assert metrics["cider"] is None and f"{metrics['clipscore']:.6f}" == match.group(1)
    assert {row["key"] for row in json.loads(per_image.read_text())} == set(PREDICTIONS)


@needs_java
def test_an_image_that_fails_to_decode_still_prints_and_saves_cider(dataset, tiny_clip_file, capsys):
    import p2_evaluate

    (dataset["root"] / "bus.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # found by name, cannot decode
    metrics_file = dataset["tmp"] / "metrics.json"
    with pytest.raises(SystemExit) as stop:
        p2_evaluate.main([str(a) for a in ("--pred_file", dataset["pred"], "--images_root", dataset["root"],
                                           "--annotation_file", dataset["ann"], "--clip-model", tiny_clip_file,
                                           "--device", "cpu", "--metrics-out", metrics_file)])
    assert "CLIPScore failed: cannot read the image of key 'bus'" in str(stop.value.code)
    cider = expected_cider({k: v[2] for k, v in IMAGES.items()}, PREDICTIONS)
    assert capsys.readouterr().out.strip() == f"CIDEr: {cider:.6f} | CLIPScore: failed"
    metrics = json.loads(metrics_file.read_text())
    assert metrics["clipscore"] is None and metrics["cider"] == pytest.approx(cider, abs=1e-12)


# ---------------------------------------------------------------------------
# Outputs: an input is never overwritten, a full disk is one line
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
@pytest.mark.parametrize("option, victim", [("--metrics-out", "--pred_file"), ("--per-image", "--annotation_file"),
                                            ("--metrics-out", "an image"), ("--per-image", "--clip-model"),
                                            ("--per-image", "--metrics-out")])
def test_an_output_that_is_an_input_is_refused_before_scoring(dataset, no_scoring, tiny_clip_file, monkeypatch,
                                                                option, victim, how):
    import shutil

    monkeypatch.setattr(no_scoring, "load_clip", lambda *args: pytest.fail("loaded CLIP before the check"))
    clip_file = dataset["tmp"] / "clip.pt"
    shutil.copy(tiny_clip_file, clip_file)
    metrics = dataset["tmp"] / "metrics.json"
    metrics.write_text("{}")
    files = {"--pred_file": dataset["pred"], "--annotation_file": dataset["ann"], "--clip-model": clip_file,
             "an image": dataset["root"] / "000000000009.JPEG", "--metrics-out": metrics}
    before = {path: path.read_bytes() for path in files.values()}
    out = files[victim]
    if how != "same":
        out = dataset["tmp"] / "link.json"
        out.symlink_to(files[victim]) if how == "symlink" else os.link(files[victim], out)
    args = ["--pred_file", dataset["pred"], "--images_root", dataset["root"], "--annotation_file", dataset["ann"],
            "--clip-model", clip_file, option, out]
    if option == "--per-image":
        args += ["--metrics-out", metrics]
    message = _main_error(no_scoring, args)
    assert message.startswith(f"error: {option} {str(out)!r} is ")
    assert "choose another output path" in message or "give each output its own path" in message
    assert {path: path.read_bytes() for path in files.values()} == before


@pytest.mark.parametrize("spelling", ["same", "dotted", "parent and back", "through a linked folder",
                                      "dangling link"])
def test_two_outputs_not_written_yet_on_one_path_are_refused_before_scoring(dataset, no_scoring, tiny_clip_file,
                                                                           spelling):
    """--metrics-out and --per-image naming one new file, however spelled: the second write would
    replace the first's finished work."""
    new = dataset["tmp"] / "new" / "scores.json"
    new.parent.mkdir()
    (dataset["tmp"] / "sub").mkdir()
    (dataset["tmp"] / "linked").symlink_to(dataset["tmp"] / "new", target_is_directory=True)
    (dataset["tmp"] / "dangling.json").symlink_to(new)
    other = {"same": str(new), "dotted": f"{new.parent}/./scores.json",
             "parent and back": f"{dataset['tmp']}/sub/../new/scores.json",
             "through a linked folder": f"{dataset['tmp']}/linked/scores.json",
             "dangling link": str(dataset["tmp"] / "dangling.json")}[spelling]
    message = _main_error(no_scoring, ["--pred_file", dataset["pred"], "--images_root", dataset["root"],
                                       "--annotation_file", dataset["ann"], "--clip-model", tiny_clip_file,
                                       "--metrics-out", new, "--per-image", other])
    assert message == (f"error: --per-image {other!r} is the same file as output --metrics-out {str(new)!r}; "
                       "give each output its own path")
    assert not new.exists()


def test_an_output_that_is_an_unread_file_beside_the_images_is_allowed(dataset, no_scoring, monkeypatch):
    monkeypatch.setattr(no_scoring, "cider_pycoco", lambda preds, refs: (1.5, {k: 1.5 for k in refs}))
    out = dataset["root"] / "metrics.json"
    out.write_text("old")
    no_scoring.main([str(a) for a in ["--pred_file", dataset["pred"], "--images_root", dataset["root"],
                                      "--annotation_file", dataset["ann"], "--no-clipscore", "--metrics-out", out]])
    assert json.loads(out.read_text())["cider"] == 1.5


def test_a_full_disk_while_saving_the_metrics_is_one_line_and_keeps_the_old_file(dataset, no_scoring, monkeypatch):


    monkeypatch.setattr(no_scoring, "cider_pycoco", lambda preds, refs: (1.5, {k: 1.5 for k in refs}))
    out = dataset["tmp"] / "metrics.json"
    out.write_text("old")
    disk_full(monkeypatch)
    message = _main_error(no_scoring, ["--pred_file", dataset["pred"], "--annotation_file", dataset["ann"],
                                       "--no-clipscore", "--metrics-out", out])
    assert message.startswith("error: no space left on ") and message.endswith(f" writing {out} (1 MB needed)")
    assert out.read_text() == "old"


@pytest.mark.parametrize("workers", ["-1", "65", "4000"])
def test_worker_counts_beyond_reason_fail_when_parsed(workers, capsys):
    """--workers 4000 would fork until the machine refuses: a typo gets argparse's one line."""
    import p2_evaluate

    with pytest.raises(SystemExit) as stop:
        p2_evaluate.main(["--pred_file", "p.json", "--images_root", "images", "--annotation_file", "a.json",
                          "--workers", workers])
    assert stop.value.code == 2
    assert f"argument --workers: expected an integer in [0, 64], got '{workers}'" in capsys.readouterr().err
