"""Training data: the course's input/target alignment, caption files, the feature cache."""
import json
import os

import pytest
import torch
from conftest import TINY_VIT, TINY_VIT_KWARGS

import synthetic
from encoder import ImageEncoder
from io_utils import InputError
from p2_data import (
    EpochSampler,
    FeatureCache,
    Split,
    make_batch,
    normalize_caption,
)
from tokenizer import BPETokenizer

EOT = 50256


@pytest.fixture(scope="module")
def tokenizer(bpe_dir):
    return BPETokenizer()


def test_alignment_on_real_captions(tokenizer):
    """input [start, t1..tN, end, pad...], target [t1..tN, end, -100...] (the course's 11/27 rule)."""
    coco = tokenizer.encode(normalize_caption("a man riding a bike."))
    flickr = tokenizer.encode(normalize_caption(" a man in a red shirt ."))
    assert coco == [64, 582, 10311, 257, 7161, 13]
    assert flickr == [64, 582, 287, 257, 2266, 10147, 13]  # leading space and detached " ." normalised
    inp, tgt = make_batch([coco, flickr])
    assert inp.tolist() == [
        [EOT, 64, 582, 10311, 257, 7161, 13, EOT],
        [EOT, 64, 582, 287, 257, 2266, 10147, 13],
    ]
    assert tgt.tolist() == [
        [64, 582, 10311, 257, 7161, 13, EOT, -100, -100][:8],
        [64, 582, 287, 257, 2266, 10147, 13, EOT],
    ]
    # position i predicts token i + 1 of the input
    assert (inp[:, 1:][tgt[:, :-1] != -100] == tgt[:, :-1][tgt[:, :-1] != -100]).all()


def test_cut_off_samples_get_no_end_target():
    inp, tgt = make_batch([[5, 6, 7], [8]], ended=[False, True])
    assert tgt.tolist() == [[5, 6, 7, -100], [8, EOT, -100, -100]]
    assert inp.tolist() == [[EOT, 5, 6, 7], [EOT, 8, EOT, EOT]]


def test_normalize_caption():
    assert normalize_caption(" two dogs  play in the grass .") == "two dogs play in the grass."
    assert normalize_caption("a cat\non a mat") == "a cat on a mat"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    synthetic.make_dataset(root, n_train=12, n_val=4, image_size=32)
    return root


def test_split_reads_the_course_layout(dataset, tokenizer):
    split = Split(dataset, "train", tokenizer)
    assert len(split.keys) == 12 and len(split.paths) == 12
    assert len(split.samples) == sum(len(split.refs[k]) for k in split.keys) == 60
    assert all(os.path.basename(p).startswith(k) for k, p in zip(split.keys, split.paths))
    index, ids = split.samples[0]
    assert tokenizer.decode(ids) == normalize_caption(split.refs[split.keys[index]][0])


def test_split_errors(dataset, tokenizer, tmp_path):
    with pytest.raises(InputError, match="images/test"):
        Split(dataset, "test", tokenizer)
    broken = tmp_path / "root"
    os.makedirs(broken / "images" / "train")
    (broken / "train.json").write_text(json.dumps({"images": []}))
    with pytest.raises(InputError, match="missing the 'annotations' list"):
        Split(str(broken), "train", tokenizer)
    data = json.load(open(os.path.join(dataset, "train.json")))
    (broken / "train.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="no image in"):
        Split(str(broken), "train", tokenizer)


def test_epoch_sampler_resumes_the_same_order():
    full = list(EpochSampler(20, seed=3, epoch=1))
    assert sorted(full) == list(range(20))
    assert list(EpochSampler(20, seed=3, epoch=1, start=8)) == full[8:]
    assert list(EpochSampler(20, seed=3, epoch=2)) != full


def test_feature_cache_is_built_once_and_keyed(dataset, tokenizer, tiny_vit_file, tmp_path, monkeypatch):
    encoder = ImageEncoder(TINY_VIT, weights=tiny_vit_file, model_kwargs=TINY_VIT_KWARGS)
    split = Split(dataset, "val", tokenizer)
    cache = FeatureCache(str(tmp_path), encoder, split, torch.device("cpu"), batch_size=3)
    assert len(cache) == 4 and cache[0].dtype == torch.float16 and cache[0].shape == (17, 64)
    from p2_data import ImageFiles

    direct = encoder(torch.stack([ImageFiles(split.paths, encoder.transform)[i] for i in range(4)]))
    torch.testing.assert_close(torch.stack([cache[i] for i in range(4)]).float(), direct, atol=2e-2, rtol=1e-2)

    calls = []
    monkeypatch.setattr(FeatureCache, "_build", staticmethod(lambda *a: calls.append(a) or {}))
    FeatureCache(str(tmp_path), encoder, split, torch.device("cpu"))
    assert calls == []  # second time: read from disk
    other = ImageEncoder(TINY_VIT, pretrained=False, model_kwargs=TINY_VIT_KWARGS)
    with pytest.raises(FileNotFoundError):  # another encoder: another key, so no stale read
        FeatureCache(str(tmp_path), other, split, torch.device("cpu"))
    assert len(calls) == 1


def test_an_interrupted_feature_cache_build_leaves_nothing_half_written(dataset, tokenizer, tiny_vit_file, tmp_path):
    encoder = ImageEncoder(TINY_VIT, weights=tiny_vit_file, model_kwargs=TINY_VIT_KWARGS)
    split = Split(dataset, "val", tokenizer)
    forward, calls = encoder.forward, []

    def fails_on_the_second_batch(images):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return forward(images)

    encoder.forward = fails_on_the_second_batch
    with pytest.raises(KeyboardInterrupt):
        FeatureCache(str(tmp_path), encoder, split, torch.device("cpu"), batch_size=3)
    assert [name for _, _, names in os.walk(tmp_path) for name in names] == []


# -- bad data: unreadable images, damaged caches, captions that cannot be targets ----------------------


def bomb_bytes() -> bytes:
    """A 14000 x 14000 PNG (24 KB on disk), beyond Pillow's bomb limit: image_io refuses it as ImageTooLarge
    (a PNG cannot be decoded at a reduced scale, as a JPEG can)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (14000, 14000)).save(buffer, "PNG")
    return buffer.getvalue()


def spoil(paths: list) -> dict:
    """Make paths[1] a truncated JPEG, paths[2] a decompression bomb, paths[3] text: index -> expected error."""
    with open(paths[1], "rb") as f:
        data = f.read()
    with open(paths[1], "wb") as f:
        f.write(data[:len(data) // 2])
    with open(paths[2], "wb") as f:
        f.write(bomb_bytes())
    with open(paths[3], "w", encoding="utf-8") as f:
        f.write("not an image\n")
    return {1: "OSError", 2: "ImageTooLarge", 3: "UnidentifiedImageError"}


@pytest.fixture
def spoiled(tmp_path):
    """A copy of a small set whose training images 1, 2, 3 cannot be read (spoil)."""
    root = str(tmp_path / "spoiled")
    synthetic.make_dataset(root, n_train=12, n_val=4, image_size=32)
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_images_are_found_in_one_pass(spoiled, tokenizer, workers):
    from p2_data import unreadable_images

    split = Split(spoiled, "train", tokenizer)
    expected = spoil(split.paths)
    found = unreadable_images(split.paths, workers)
    assert sorted(found) == sorted(expected)
    assert all(found[i].startswith(kind + ":") for i, kind in expected.items()), found


def test_unreadable_images_are_skipped_with_their_captions_or_refused(spoiled, tokenizer, capsys):
    from p2_data import skip_unreadable, unreadable_images

    split = Split(spoiled, "train", tokenizer)
    spoil(split.paths)
    unreadable = unreadable_images(split.paths)
    bad = [split.paths[i] for i in sorted(unreadable)]
    with pytest.raises(InputError, match="3 of the 12 images .* cannot be read .--strict-data.") as error:
        skip_unreadable(split, unreadable, strict=True)
    assert all(path in str(error.value) for path in bad) and "Traceback" not in str(error.value)

    keys_left = [k for i, k in enumerate(split.keys) if i not in unreadable]
    dropped = sum(len(split.refs[split.keys[i]]) for i in unreadable)
    before = len(split.samples)
    kept = skip_unreadable(split, unreadable, strict=False)
    err = capsys.readouterr().err
    assert all(f"skipping train image {path!r}" in err for path in bad), err
    assert f"the 3 unreadable image(s) and their {dropped} caption(s) are left out" in err
    assert kept == [0] + list(range(4, 12)) and split.keys == keys_left and sorted(split.refs) == keys_left
    assert len(split.samples) == before - dropped and split.dropped_captions == dropped
    assert sorted(split.skipped) == sorted(bad)
    # the samples are renumbered: each still points at its own image's captions
    for index, ids in split.samples:
        assert tokenizer.decode(ids) in [normalize_caption(c) for c in split.refs[split.keys[index]]]


def test_no_readable_image_is_an_error(spoiled, tokenizer):
    from p2_data import skip_unreadable

    split = Split(spoiled, "val", tokenizer)
    with pytest.raises(InputError, match="none of the 4 images"):
        skip_unreadable(split, {i: "OSError: broken" for i in range(4)}, strict=False)


def test_an_image_unreadable_mid_run_is_named_without_a_worker_traceback(spoiled, tokenizer):
    """Every image is checked before the first step; one spoiled after it still ends in one line."""
    from torch.utils.data import DataLoader

    from p2_data import ImageFiles, UnreadableImage

    split = Split(spoiled, "train", tokenizer)
    spoil(split.paths)
    for workers in (0, 2):
        loader = DataLoader(ImageFiles(split.paths, lambda image: torch.zeros(1)), batch_size=4,
                            num_workers=workers)
        with pytest.raises(UnreadableImage) as error:
            list(loader)
        message = str(error.value)
        assert message.startswith(f"cannot read image {split.paths[1]!r} (OSError") and "\n" not in message, message


def test_the_feature_cache_records_unreadable_images(spoiled, tokenizer, tiny_vit_file, tmp_path, monkeypatch):
    encoder = ImageEncoder(TINY_VIT, weights=tiny_vit_file, model_kwargs=TINY_VIT_KWARGS)
    split = Split(spoiled, "train", tokenizer)
    expected = spoil(split.paths)
    cache = FeatureCache(str(tmp_path), encoder, split, torch.device("cpu"), batch_size=3, workers=2)
    assert sorted(cache.unreadable) == sorted(expected)
    assert all(cache.unreadable[i].startswith(kind) for i, kind in expected.items())
    assert all(not cache[i].any() for i in expected) and cache[0].any()
    monkeypatch.setattr(FeatureCache, "_build", staticmethod(lambda *a: pytest.fail("rebuilt")))
    assert FeatureCache(str(tmp_path), encoder, split, torch.device("cpu")).unreadable == cache.unreadable


@pytest.fixture
def cached(dataset, tokenizer, tiny_vit_file, tmp_path):
    """(encoder, val split, the cache folder with its index and array): a built cache of the val split."""
    encoder = ImageEncoder(TINY_VIT, weights=tiny_vit_file, model_kwargs=TINY_VIT_KWARGS)
    split = Split(dataset, "val", tokenizer)
    cache = FeatureCache(str(tmp_path), encoder, split, torch.device("cpu"))
    return encoder, split, cache


def rebuilds(encoder, split, folder, monkeypatch) -> list:
    """Open the cache again, counting the builds."""
    builds, build = [], FeatureCache._build
    monkeypatch.setattr(FeatureCache, "_build", staticmethod(lambda *a: builds.append(1) or build(*a)))
    cache = FeatureCache(folder, encoder, split, torch.device("cpu"))
    assert len(cache) == len(split.keys) and cache[0].shape == (17, 64)
    return builds


@pytest.mark.parametrize("damage, message", [
    (lambda index, array: index.write_text(index.read_text()[:15]), "feature cache index {index} is damaged"),
    (lambda index, array: index.write_text("[1, 2]"), "feature cache index {index} is not an index"),
    (lambda index, array: array.write_bytes(array.read_bytes()[:300]), "feature cache {array} cannot be read"),
    (lambda index, array: array.write_bytes(b"junk"), "feature cache {array} cannot be read"),
    (lambda index, array: array.unlink(), "feature cache {array} cannot be read"),
])
def test_a_damaged_feature_cache_is_named_and_rebuilt(cached, tmp_path, monkeypatch, capsys, damage, message):
    encoder, split, cache = cached
    index, array = (type(tmp_path)(os.path.join(cache.folder, "val" + ext)) for ext in (".json", ".npy"))
    first = [cache[i].clone() for i in range(len(cache))]
    del cache
    capsys.readouterr()
    damage(index, array)
    assert rebuilds(encoder, split, str(tmp_path), monkeypatch) == [1]
    assert message.format(index=index, array=array) in capsys.readouterr().err
    assert rebuilds(encoder, split, str(tmp_path), monkeypatch) == []  # rebuilt for good
    again = FeatureCache(str(tmp_path), encoder, split, torch.device("cpu"))
    assert all(torch.equal(again[i], first[i]) for i in range(len(first)))


def test_an_image_replaced_with_the_same_size_and_time_is_not_served_stale_features(cached, tmp_path,
                                                                                      monkeypatch):
    encoder, split, cache = cached
    old = cache[0].clone()
    target, other = split.paths[0], split.paths[1]
    with open(other, "rb") as f:
        data = f.read()
    size, stat = os.path.getsize(target), os.stat(target)
    data = data[:size] if len(data) >= size else data + b"\0" * (size - len(data))  # bytes after the end are ignored
    with open(target, "wb") as f:
        f.write(data)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.path.getsize(target) == size and os.stat(target).st_mtime_ns == stat.st_mtime_ns
    assert rebuilds(encoder, split, str(tmp_path), monkeypatch) == [1]
    assert not torch.equal(FeatureCache(str(tmp_path), encoder, split, torch.device("cpu"))[0], old)


@pytest.mark.parametrize("caption, why", [
    ("a dog<|endoftext|> runs", "'<|endoftext|>', GPT-2's end-of-text marker"),
    ("<|endoftext|>", "'<|endoftext|>', GPT-2's end-of-text marker"),
])
def test_a_caption_that_cannot_be_a_target_is_named(dataset, tokenizer, tmp_path, caption, why):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(dataset, root)
    data = json.loads((root / "train.json").read_text(encoding="utf-8"))
    data["annotations"][3]["caption"] = caption
    (root / "train.json").write_text(json.dumps(data), encoding="utf-8")
    key = {i["id"]: i["file_name"].rsplit(".", 1)[0] for i in data["images"]}[data["annotations"][3]["image_id"]]
    with pytest.raises(InputError) as error:
        Split(str(root), "train", tokenizer)
    message = str(error.value)
    assert message.startswith(f"{root / 'train.json'}: the caption {caption!r} of image {key!r}"), message
    assert why in message


def test_a_caption_with_a_lone_surrogate_is_refused_when_the_file_is_read(dataset, tokenizer, tmp_path):
    """UTF-8 cannot encode "\\ud800": read_json names the file and the caption's place in it."""
    import shutil

    root = tmp_path / "root"
    shutil.copytree(dataset, root)
    data = json.loads((root / "train.json").read_text(encoding="utf-8"))
    data["annotations"][3]["caption"] = "a cat \ud800 sits"
    (root / "train.json").write_text(json.dumps(data), encoding="utf-8")  # \ud800 written as its escape
    with pytest.raises(InputError) as error:
        Split(str(root), "train", tokenizer)
    message = str(error.value)
    assert repr(str(root / "train.json")) in message and '["annotations"][3]["caption"]' in message, message
    assert "lone UTF-16 surrogate" in message
    message.encode("utf-8")  # printable: the lone surrogate is shown escaped


def test_a_validation_split_that_repeats_the_training_split_is_warned_about(dataset, tokenizer, tmp_path):
    import shutil

    from p2_data import split_overlap

    train, val = Split(dataset, "train", tokenizer), Split(dataset, "val", tokenizer)
    assert split_overlap(train, val) is None
    same = tmp_path / "same"
    shutil.copytree(dataset, same)
    shutil.rmtree(same / "images" / "val")
    shutil.copytree(same / "images" / "train", same / "images" / "val")
    shutil.copy(same / "train.json", same / "val.json")
    message = split_overlap(Split(str(same), "train", tokenizer), Split(str(same), "val", tokenizer))
    assert message.startswith(f"12 of the 12 validation images ({same / 'val.json'}, {same / 'images' / 'val'})")
    assert f"({same / 'train.json'}, {same / 'images' / 'train'})" in message
    # copies under other names, with other captions: still the same images
    renamed = tmp_path / "renamed"
    shutil.copytree(dataset, renamed)
    for name in sorted(os.listdir(renamed / "images" / "val"))[:2]:
        source = sorted(os.listdir(renamed / "images" / "train"))[0 if name < "5" else 1]
        shutil.copy(renamed / "images" / "train" / source, renamed / "images" / "val" / name)
    message = split_overlap(Split(str(renamed), "train", tokenizer), Split(str(renamed), "val", tokenizer))
    assert message.startswith("2 of the 4 validation images"), message


def test_the_fingerprint_follows_keys_and_captions(dataset, tokenizer, tmp_path):
    import shutil

    first = Split(dataset, "train", tokenizer).fingerprint()
    assert first == Split(dataset, "train", tokenizer).fingerprint()
    assert (first["images"], first["captions"]) == (12, 60)
    root = tmp_path / "root"
    shutil.copytree(dataset, root)
    data = json.loads((root / "train.json").read_text(encoding="utf-8"))
    data["annotations"][0]["caption"] = "another caption"
    (root / "train.json").write_text(json.dumps(data), encoding="utf-8")
    changed = Split(str(root), "train", tokenizer).fingerprint()
    assert changed["captions"] == 60 and changed["sha1"] != first["sha1"]
