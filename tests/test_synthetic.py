"""The synthetic set has the course's layout, is deterministic, and its captions tell the truth."""
import json
import os
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOR_WORDS = set(synthetic.COLORS) | {"gray"}
PLACE_WORDS = set(synthetic.POSITIONS) | {"middle"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    return synthetic.make_dataset(root, n_train=60, n_val=20, image_size=32, seed=0)


def _load(summary, split):
    with open(summary[split]["json"]) as f:
        return json.load(f)


@pytest.mark.parametrize("split", ["train", "val"])
def test_json_and_files_follow_the_course_layout(dataset, split):
    data = _load(dataset, split)
    assert set(data) == {"annotations", "images"}
    assert all(set(im) == {"file_name", "id"} for im in data["images"])
    assert all(set(a) == {"caption", "image_id", "id"} for a in data["annotations"])
    ids = [im["id"] for im in data["images"]]
    assert len(ids) == len(set(ids)) == dataset[split]["n_images"]
    ann_ids = [a["id"] for a in data["annotations"]]
    assert len(ann_ids) == len(set(ann_ids)) == dataset[split]["n_captions"]
    per_image = Counter(a["image_id"] for a in data["annotations"])
    assert set(per_image) == set(ids) and set(per_image.values()) == {5}

    folder = os.path.join(os.path.dirname(dataset[split]["json"]), "images", split)
    assert sorted(os.listdir(folder)) == sorted(im["file_name"] for im in data["images"])
    for im in data["images"]:
        with Image.open(os.path.join(folder, im["file_name"])) as img:
            img.load()
            assert img.format == "JPEG" and img.size == (32, 32)

    styles = {}
    for im in data["images"]:
        stem = im["file_name"][:-len(".jpg")]
        assert re.fullmatch(r"\d{12}|\d{10}", stem) and int(stem) == im["id"]
        styles[im["id"]] = "coco" if len(stem) == 12 else "flickr"
    assert set(styles.values()) == {"coco", "flickr"}
    for a in data["annotations"]:
        text = a["caption"]
        assert text == text.lower()
        if styles[a["image_id"]] == "flickr":
            assert text.startswith(" ") and text.endswith(" .") and not text.startswith("  ")
        else:
            assert not text.startswith(" ") and not text.endswith(" .")


def test_image_ids_are_unique_across_splits(dataset):
    train_ids = {im["id"] for im in _load(dataset, "train")["images"]}
    val_ids = {im["id"] for im in _load(dataset, "val")["images"]}
    assert not train_ids & val_ids


def test_captions_describe_the_drawn_scene(dataset):
    for split in ("train", "val"):
        captions = {}
        for a in _load(dataset, split)["annotations"]:
            captions.setdefault(a["image_id"], []).append(a["caption"])
        for scene in dataset[split]["scenes"]:
            texts = captions[scene["image_id"]]
            assert len(set(texts)) == len(texts), "an image's captions should differ in wording"
            shapes = {o["shape"] for o in scene["objects"]}
            visible = {o["color"] for o in scene["objects"]} | {scene["background"]}
            positions = {o["position"] for o in scene["objects"]}
            for text in texts:
                words = set(re.findall(r"[a-z]+", text))
                assert shapes <= words and not (set(synthetic.SHAPES) - shapes) & words, (text, scene)
                assert (words & COLOR_WORDS) <= visible, (text, scene)
                assert (words & set(synthetic.SIZES)) <= {o["size"] for o in scene["objects"]}, (text, scene)
                said = {"middle": "center"}.get
                assert {said(w, w) for w in words & PLACE_WORDS} <= positions, (text, scene)


def test_pixels_match_the_scene(dataset):
    """At 32x32 each object's centre shows its colour and a corner shows the background."""
    pos = synthetic.POSITIONS  # image coordinates: x grows rightwards, y downwards
    assert pos["left"][0] < pos["center"][0] == 0.5 < pos["right"][0]
    assert pos["top"][1] < pos["center"][1] == 0.5 < pos["bottom"][1]
    folder = os.path.dirname(dataset["train"]["images_dir"])
    palette = dict(synthetic.COLORS, gray=synthetic.GRAY)
    names, rgbs = list(palette), np.array(list(palette.values()), dtype=float)

    def nearest(pixel):
        return names[int(np.argmin(((rgbs - pixel) ** 2).sum(1)))]

    checked = 0
    for scene in dataset["train"]["scenes"]:
        if scene["mode"] != "RGB":
            continue
        with Image.open(os.path.join(folder, "train", scene["file_name"])) as img:
            pixels = np.asarray(img.convert("RGB"), dtype=float)
        assert nearest(pixels[0, 0]) == scene["background"]
        for obj in scene["objects"]:
            fx, fy = synthetic.POSITIONS[obj["position"]]
            assert nearest(pixels[int(fy * 32), int(fx * 32)]) == obj["color"], (obj, scene)
            checked += 1
    assert checked > 40


def test_some_images_are_grayscale_or_cmyk(dataset):
    folder = dataset["train"]["images_dir"]
    modes = Counter()
    for scene in dataset["train"]["scenes"]:
        with Image.open(os.path.join(folder, scene["file_name"])) as img:
            assert img.mode == scene["mode"]
            modes[img.mode] += 1
        if scene["mode"] == "L":
            assert {o["color"] for o in scene["objects"]} == {"gray"}
            assert scene["background"] in {"black", "white"}
    assert modes["L"] == dataset["train"]["n_gray"] >= 1
    assert modes["CMYK"] == dataset["train"]["n_cmyk"] >= 1
    assert modes["RGB"] > 0.8 * sum(modes.values())


def _tree_bytes(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        synthetic.make_dataset(str(tmp_path / name), n_train=12, n_val=4, image_size=32, seed=seed)
        runs[name] = _tree_bytes(tmp_path / name)
    assert len(runs["a"]) == 12 + 4 + 2
    assert runs["a"] == runs["b"]
    assert runs["a"]["train.json"] != runs["c"]["train.json"]
    assert set(runs["a"]) != set(runs["c"])  # different seed, different image ids


def test_cli_writes_the_set(tmp_path):
    out = tmp_path / "p2_data"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "synthetic.py"), str(out), "--train", "6", "--val", "3",
         "--size", "48", "--seed", "1"],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "train: 6 images, 30 captions" in result.stdout
    with open(out / "val.json") as f:
        val = json.load(f)
    assert len(val["images"]) == 3 and len(val["annotations"]) == 15
    name = val["images"][0]["file_name"]
    with Image.open(out / "images" / "val" / name) as img:
        assert img.size == (48, 48)


def test_report_images_have_the_p3_names(tmp_path):
    paths = synthetic.make_report_images(str(tmp_path / "p3_data" / "images"), size=96)
    assert [os.path.basename(p) for p in paths] == ["bike.jpg", "girl.jpg", "sheep.jpg", "ski.jpg",
                                                    "umbrella.jpg"]
    for path in paths:
        with Image.open(path) as img:
            img.load()
            assert img.mode == "RGB" and img.size == (96, 96)
