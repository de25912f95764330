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
    monkeypatch.setattr(FeatureCache, "_build", staticmethod(lambda *a: calls.append(a)))
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
