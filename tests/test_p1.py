"""Problem 1 (CLIP zero-shot): the graders' entry point end to end on a tiny
random CLIP, the prompt/flip ensemble against a direct computation, input
validation, and the report helper."""
import csv
import json
import os
import shutil
import subprocess
import sys

import clip
import numpy as np
import pytest
import torch
from conftest import disk_full
from PIL import Image, ImageOps

import io_utils
import p1_report
import p1_zeroshot as zs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Ids are not 0..K-1 and names need cleaning, as CIFAR-100's would.
ID2LABEL = {"0": "maple_tree", "3": "aquarium_fish", "4": "bicycle", "11": "pickup  truck"}


@pytest.fixture(autouse=True)
def on_cpu(monkeypatch):
    """The direct computations run in fp32 on the CPU; so does the code under test,
    even on a machine with a GPU (where CLIP would run in fp16)."""
    monkeypatch.setattr(io_utils, "pick_device", lambda: torch.device("cpu"))


def write_json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def noise_image(seed, mode="RGB"):
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def save_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(names):
        noise_image(seed).save(folder / name)
    return folder


def direct_probs(clip_file, paths, classnames, templates):
    """[N, K] ensemble probabilities written out from CLIP's own API, image by
    image, class by class: the formula p1_zeroshot must implement."""
    import clip

    model, preprocess = clip.load(clip_file, device="cpu", jit=False)
    with torch.no_grad():
        text = []
        for name in classnames:
            name = " ".join(name.replace("_", " ").split())
            emb = model.encode_text(clip.tokenize([t.format(name) for t in templates]))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(dim=0)
            text.append(mean / mean.norm())
        text = torch.stack(text)
        images = []
        for path in paths:
            image = Image.open(path)
            image.load()
            image = zs.image_io.to_rgb(image)
            views = torch.stack([preprocess(image), preprocess(ImageOps.mirror(image))])
            emb = model.encode_image(views)
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(dim=0)
            images.append(mean / mean.norm())
        images = torch.stack(images)
        return torch.softmax(model.logit_scale.exp() * images @ text.t(), dim=-1)


def assert_same_argmax(labels, probs, class_ids):
    """The CSV label is the direct argmax; near-ties (float noise) may go either way."""
    clear = 0
    for label, row in zip(labels, probs):
        top2 = row.topk(2)
        if float(top2.values[0] - top2.values[1]) > 1e-4:
            assert label == class_ids[int(top2.indices[0])]
            clear += 1
        else:
            assert label in {class_ids[int(i)] for i in top2.indices}
    assert clear >= len(labels) - 1


def run_hw3_1(args, clip_file, tmp_path):
    env = dict(os.environ, HW3_P1_CLIP=clip_file, HW3_CACHE=str(tmp_path / "cache"),
               CUDA_VISIBLE_DEVICES="")  # CPU, as on_cpu does in-process
    return subprocess.run(["bash", "hw3_1.sh", *args], check=False, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


# ---------------------------------------------------------------- end to end

READABLE = {
    "plain.png": "RGB", "with space.png": "L", "a.b.c.png": "RGBA", "UPPER.PNG": "P",
    "貓_1.png": "I;16", "café.jpg": "CMYK", "comma,name.png": "RGB", 'say "hi".png': "RGB",
}


NOT_UTF8 = b"caf\xe9 latin-1.png"


@pytest.fixture(scope="module")
def e2e(tiny_clip_file, tmp_path_factory):
    """One run of `bash hw3_1.sh` on a folder of tricky names, modes and non-images."""
    tmp = tmp_path_factory.mktemp("p1_e2e")
    folder = tmp / "images"
    folder.mkdir()
    for seed, (name, mode) in enumerate(READABLE.items()):
        if mode == "I;16":
            gray = np.random.default_rng(seed).integers(0, 65536, (32, 32), dtype=np.uint16)
            Image.fromarray(gray).save(folder / name)
        elif mode == "P":
            noise_image(seed).convert("P", palette=Image.ADAPTIVE).save(folder / name)
        else:
            noise_image(seed, mode).save(folder / name)
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    whole = (folder / "plain.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    with open(os.path.join(os.fsencode(folder), NOT_UTF8), "wb") as f:
        f.write(whole)  # a good image whose name no UTF-8 CSV can hold
    os.symlink(folder / "moved_away.png", folder / "dangling.png")
    id2label = write_json(tmp / "id2label.json", ID2LABEL)
    out = tmp / "not" / "yet" / "pred.csv"
    result = run_hw3_1([str(folder), id2label, str(out)], tiny_clip_file, tmp)
    return folder, out, result


def test_hw3_1_writes_one_row_per_readable_image(e2e):
    _, out, result = e2e
    assert result.returncode == 0, result.stderr
    rows = read_csv(out)
    assert rows[0] == ["filename", "label"]
    names = [r[0] for r in rows[1:]]
    assert names == sorted(READABLE)
    assert all(len(r) == 2 and r[1] in ID2LABEL for r in rows[1:])
    for skipped in ("notes.txt", "broken.png", "truncated.png"):
        assert f"'{skipped}'" in result.stderr
    assert "'plain.png'" not in result.stderr


def test_hw3_1_skips_a_name_that_is_not_utf8_and_a_dangling_link_with_warnings(e2e):
    _, out, result = e2e
    assert result.returncode == 0, result.stderr
    assert f"skipping {NOT_UTF8!r}: its name is not valid UTF-8" in result.stderr
    assert "skipping 'dangling.png': a symbolic link to" in result.stderr
    assert len(read_csv(out)) == 1 + len(READABLE)


def test_hw3_1_labels_equal_direct_computation(e2e, tiny_clip_file):
    folder, out, result = e2e
    assert result.returncode == 0, result.stderr
    rows = read_csv(out)[1:]
    class_ids = sorted(int(k) for k in ID2LABEL)
    names = [ID2LABEL[str(i)] for i in class_ids]
    probs = direct_probs(tiny_clip_file, [folder / r[0] for r in rows], names, zs.TEMPLATES)
    assert_same_argmax([int(r[1]) for r in rows], probs, class_ids)


def test_hw3_1_script_runs_one_python3_line():
    """After the argument count, one line: offline, the three paths after `--` (tests/test_grader_scripts.py)."""
    with open(os.path.join(REPO, "hw3_1.sh")) as f:
        lines = f.read().splitlines()
    assert lines[-1] == 'HF_HUB_OFFLINE=1 python3 p1_zeroshot.py -- "$1" "$2" "$3"'
    assert [line for line in lines if "python3 " in line and not line.startswith("#")] == lines[-1:]


def test_unknown_model_exits_nonzero_and_keeps_old_output(tmp_path):
    folder = save_images(tmp_path / "images", ["a.png"])
    id2label = write_json(tmp_path / "id2label.json", ID2LABEL)
    out = tmp_path / "pred.csv"
    out.write_text("old\n")
    result = run_hw3_1([str(folder), id2label, str(out)], "ViT-Z/99", tmp_path)
    assert result.returncode != 0
    assert "CLIP model 'ViT-Z/99' not found; expected one of the models [" in result.stderr
    assert "ViT-L/14@336px" in result.stderr
    assert out.read_text() == "old\n"


# ---------------------------------------------------------------- units

def test_clean_classname():
    assert zs.clean_classname("maple_tree") == "maple tree"
    assert zs.clean_classname("  aquarium__fish\t") == "aquarium fish"
    assert zs.clean_classname("pickup  truck") == "pickup truck"
    assert zs.clean_classname("bicycle") == "bicycle"


def test_templates_are_clips_18_cifar_prompts():
    assert len(zs.TEMPLATES) == 18
    assert len(set(zs.TEMPLATES)) == 18
    assert all(t.count("{}") == 1 and "{" not in t.replace("{}", "") for t in zs.TEMPLATES)
    assert zs.TEMPLATES[0] == "a photo of a {}."
    assert sum(" the " in t for t in zs.TEMPLATES) == 9


def test_text_embeddings_are_the_normalised_template_mean(tiny_clip_file):
    import clip

    model, _ = zs.load_clip(tiny_clip_file, torch.device("cpu"))
    got = zs.text_embeddings(model, ["maple_tree", "bicycle", "pickup  truck"], zs.TEMPLATES, torch.device("cpu"))
    assert got.shape == (3, model.text_projection.shape[1])
    assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-5)
    with torch.no_grad():
        for row, name in zip(got, ["maple tree", "bicycle", "pickup truck"]):
            emb = model.encode_text(clip.tokenize([t.format(name) for t in zs.TEMPLATES]))
            mean = (emb / emb.norm(dim=-1, keepdim=True)).mean(dim=0)
            assert torch.allclose(row, mean / mean.norm(), atol=1e-5)


def test_image_embeddings_and_probs_match_direct(tiny_clip_file, tmp_path):
    paths = [str(p) for p in sorted(save_images(tmp_path, ["a.png", "b.png", "c.png"]).iterdir())]
    device = torch.device("cpu")
    model = zs.load_clip(tiny_clip_file, device)
    kept, image_embs = zs.image_embeddings([model], paths, device, batch_size=2)
    assert kept == paths
    assert torch.allclose(image_embs[0].norm(dim=-1), torch.ones(3), atol=1e-5)
    names = list(ID2LABEL.values())
    text = zs.text_embeddings(model[0], names, zs.TEMPLATES, device)
    got = zs.ensemble_probs(image_embs, [text], [zs.logit_scale(model[0])])
    want = direct_probs(tiny_clip_file, paths, names, zs.TEMPLATES)
    assert torch.allclose(got, want, atol=1e-4)
    # Two copies of one model average to that model's probabilities.
    twice = zs.ensemble_probs(image_embs * 2, [text, text], [zs.logit_scale(model[0])] * 2)
    assert torch.allclose(twice, got, atol=1e-6)


def test_profile_names_every_phase_and_is_an_output(tiny_clip_file, tmp_path, monkeypatch):
    """HW3_P1_PROFILE: where a run's time goes (what the GPU check reads); it never replaces an input."""
    folder = save_images(tmp_path / "images", ["a.png", "b.png", "c.png"])
    id2label = write_json(tmp_path / "id2label.json", ID2LABEL)
    monkeypatch.setenv("HW3_P1_CLIP", tiny_clip_file)
    monkeypatch.setenv("HW3_P1_BATCH", "2")
    monkeypatch.setenv("HW3_P1_PROFILE", str(tmp_path / "profile.json"))
    zs.main([str(folder), id2label, str(tmp_path / "pred.csv")])
    profile = json.loads((tmp_path / "profile.json").read_text(encoding="utf-8"))
    assert set(profile["seconds"]) == {"load", "text", "read", "encode", "write"}
    assert all(s >= 0 for s in profile["seconds"].values())
    assert profile["images"] == 3 and profile["batch"] == 2 and profile["models"] == [tiny_clip_file]
    monkeypatch.setenv("HW3_P1_PROFILE", id2label)
    with pytest.raises(SystemExit, match="error: HW3_P1_PROFILE .* is the input ID2LABEL"):
        zs.main([str(folder), id2label, str(tmp_path / "pred2.csv")])
    assert json.loads(open(id2label, encoding="utf-8").read()) == ID2LABEL


def test_class_text_is_encoded_once_per_run(tiny_clip_file, tmp_path, monkeypatch):
    from clip.model import CLIP

    calls = []
    original = CLIP.encode_text

    def counting(self, text):
        calls.append(len(text))
        return original(self, text)

    monkeypatch.setattr(CLIP, "encode_text", counting)
    monkeypatch.setenv("HW3_P1_CLIP", tiny_clip_file)
    monkeypatch.setenv("HW3_P1_BATCH", "2")
    id2label = write_json(tmp_path / "id2label.json", ID2LABEL)
    counts = []
    for n in (1, 7):
        folder = save_images(tmp_path / f"n{n}", [f"{i}.png" for i in range(n)])
        calls.clear()
        zs.main([str(folder), id2label, str(tmp_path / f"n{n}.csv")])
        counts.append((len(calls), sum(calls)))
        assert len(read_csv(tmp_path / f"n{n}.csv")) == n + 1
    assert counts[0] == counts[1]
    assert counts[0][1] == len(ID2LABEL) * len(zs.TEMPLATES)


def test_wrong_file_as_clip_checkpoint_says_what_it_is_not(tiny_vit_file, tmp_path):
    with pytest.raises(io_utils.InputError) as error:
        zs.load_clip(tiny_vit_file, torch.device("cpu"))
    message = str(error.value)
    assert f"{tiny_vit_file!r} is not a CLIP checkpoint: it has no tensor 'visual.layer1.0.conv1.weight'" in message
    assert "expected OpenAI's CLIP weights" in message
    (tmp_path / "page.pt").write_text("<html>not found</html>")
    with pytest.raises(io_utils.InputError, match="'.*page.pt' is not a CLIP checkpoint: .*expected OpenAI's CLIP"):
        zs.load_clip(str(tmp_path / "page.pt"), torch.device("cpu"))


def test_the_reused_functions_raise_input_errors_not_exits(tmp_path):
    """hw3_cache.py and p1_report.py call these: libraries raise, only an entry point's main exits."""
    path = write_json(tmp_path / "id2label.json", ["not", "an", "object"])
    with pytest.raises(io_utils.InputError, match="must hold a JSON object"):
        zs.read_id2label(path)
    with pytest.raises(io_utils.InputError, match="CLIP model 'ViT-Z/99' not found"):
        zs.model_specs("ViT-Z/99")
    with pytest.raises(io_utils.InputError, match="the name of class 0 .* is too long"):
        zs.check_prompt_lengths({0: "word " * 100}, zs.TEMPLATES)


def test_two_ids_with_the_same_prompts_warn(tmp_path, capsys):
    path = write_json(tmp_path / "id2label.json", {"0": "maple_tree", "1": "oak", "2": "Maple  Tree", "3": "OAK"})
    assert zs.read_id2label(path) == {0: "maple_tree", 1: "oak", 2: "Maple  Tree", 3: "OAK"}
    err = capsys.readouterr().err
    assert "class 2 ('Maple  Tree') has the same prompts as class 0 ('maple_tree'); class 2 can never be predicted" in err
    assert "class 3 ('OAK') has the same prompts as class 1 ('oak')" in err
    write_json(tmp_path / "id2label.json", ID2LABEL)
    zs.read_id2label(path)
    assert "same prompts" not in capsys.readouterr().err


def test_read_id2label_sorts_ids(tmp_path):
    path = write_json(tmp_path / "a.json", {"10": "b", "2": "a_b"})
    assert zs.read_id2label(path) == {2: "a_b", 10: "b"}
    assert list(zs.read_id2label(path)) == [2, 10]


def test_download_notice_only_when_not_cached_and_never_offline(tiny_clip_file, tmp_path, monkeypatch, capsys):
    import clip_weights

    monkeypatch.setenv("HW3_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    fetched = []
    monkeypatch.setattr(clip_weights, "fetch", lambda name, purpose="": fetched.append(name) or tiny_clip_file)
    zs.load_clip("ViT-L/14@336px", torch.device("cpu"))
    err = capsys.readouterr().err
    assert "downloading" in err and "bash hw3_download.sh" in err
    assert fetched == ["ViT-L/14@336px"]

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as hw3_1.sh runs: an error naming the fix, no download
    with pytest.raises(io_utils.InputError) as error:
        zs.load_clip("ViT-L/14", torch.device("cpu"))
    assert f"CLIP ViT-L/14 is not in {tmp_path / 'clip'}" in str(error.value)
    assert "bash hw3_download.sh" in str(error.value) and fetched == ["ViT-L/14@336px"]

    (tmp_path / "clip").mkdir()
    shutil.copyfile(tiny_clip_file, clip_weights.cached_path("ViT-L/14@336px"))
    model, _ = zs.load_clip("ViT-L/14@336px", torch.device("cpu"))  # from the cache, offline, no notice
    assert "downloading" not in capsys.readouterr().err and fetched == ["ViT-L/14@336px"]
    assert model.visual.input_resolution == 32


def test_an_openai_archive_loads_as_data(tiny_clip_file, tiny_clip_archive, monkeypatch):
    """OpenAI's TorchScript format is read without torch.jit.load (which runs the archive's code) and gives
    the model its state dict gives."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load ran")
    monkeypatch.setattr(torch.jit, "load", refuse)
    from_archive, _ = zs.load_clip(tiny_clip_archive, torch.device("cpu"))
    from_state, _ = zs.load_clip(tiny_clip_file, torch.device("cpu"))
    expected = from_state.state_dict()
    assert sorted(from_archive.state_dict()) == sorted(expected)
    for name, tensor in from_archive.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("how", ["os.system", "eval"])
def test_a_clip_file_that_would_run_code_is_refused_and_runs_nothing(how, tmp_path):
    class RunsCode:
        def __reduce__(self):
            if how == "eval":
                return eval, (f"open({str(tmp_path / 'marker')!r}, 'w')",)
            return os.system, (f"touch '{tmp_path / 'marker'}'",)
    torch.save({"visual.proj": torch.zeros(2), "code": RunsCode()}, tmp_path / "model.pt")
    with pytest.raises(io_utils.InputError) as error:
        zs.load_clip(str(tmp_path / "model.pt"), torch.device("cpu"))
    message = str(error.value)
    assert message.startswith(f"{str(tmp_path / 'model.pt')!r} is not a CLIP checkpoint: it holds objects other "
                              "than tensors and plain containers: ") and "\n" not in message
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("content, what", [
    ("ViT-L/14\n", "it is text starting with 'ViT-L/14'"),
    ("clip weights are elsewhere", "it is text starting with 'clip weights are elsewhere'"),
    ("", "it is empty"),
])
def test_a_small_text_file_as_clip_says_what_it_is(content, what, tmp_path):
    (tmp_path / "clip.txt").write_text(content, encoding="utf-8")
    with pytest.raises(io_utils.InputError) as error:
        zs.load_clip(str(tmp_path / "clip.txt"), torch.device("cpu"))
    message = str(error.value)
    assert message.startswith(f"{str(tmp_path / 'clip.txt')!r} is not a CLIP checkpoint: {what}; expected ")
    assert "\n" not in message and "544502645" not in message


def test_clip_weights_that_do_not_fit_together_are_one_line(tiny_clip_file, tmp_path):
    """A tensor of another size than the file's other tensors give: which file, which tensor, both shapes."""
    state = torch.load(tiny_clip_file)
    state["transformer.resblocks.1.mlp.c_fc.weight"] = torch.zeros(128, 64)  # CLIP's width 64 has 256 there
    torch.save(state, tmp_path / "mixed.pt")
    with pytest.raises(io_utils.InputError) as error:
        zs.load_clip(str(tmp_path / "mixed.pt"), torch.device("cpu"))
    message = str(error.value)
    assert "\n" not in message and message.count("shape") == 1
    assert str(tmp_path / "mixed.pt") in message and "(128, 64)" in message and "(256, 64)" in message
    assert "not one CLIP's weights" in message
    del state["transformer.resblocks.1.mlp.c_fc.weight"]
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(io_utils.InputError, match=r"complete CLIP checkpoint: 1 weight\(s\) missing, e\.g\. "
                                                  r"\['transformer.resblocks.1.mlp.c_fc.weight'\]"):
        zs.load_clip(str(tmp_path / "other.pt"), torch.device("cpu"))
    state = torch.load(tiny_clip_file)
    state["decoder.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "more.pt")
    with pytest.raises(io_utils.InputError, match=r"holds 1 tensor\(s\) that a CLIP .* \['decoder.extra.weight'\]"):
        zs.load_clip(str(tmp_path / "more.pt"), torch.device("cpu"))


# ---------------------------------------------------------------- bad inputs

def _bad_json(tmp_path, text):
    path = tmp_path / "id2label.json"
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("case, expected", [
    ("missing folder", "does not exist"),
    ("empty folder", "contains no files"),
    ("only text", "no readable image"),
    ("not json", "is not valid JSON"),
    ("json list", "must hold a JSON object"),
    ("empty object", "empty JSON object"),
    ("non-integer key", "key 'cat' is not an integer class id"),
    ("non-string value", "must be a non-empty string"),
    ("duplicate id", "repeats class id 1"),
    ("unknown model", "CLIP model 'no-such-model' not found; expected one of the models ["),
    ("long class name", "the name of class 7 (500 characters, 'xxxxx"),
])
@pytest.mark.parametrize("existing_output", [False, True])
def test_bad_inputs_exit_with_message_and_no_output(case, expected, existing_output, tiny_clip_file,
                                                    tmp_path, monkeypatch):
    monkeypatch.setenv("HW3_P1_CLIP", "no-such-model" if case == "unknown model" else tiny_clip_file)
    folder = save_images(tmp_path / "images", ["a.png"])
    id2label = write_json(tmp_path / "ok.json", ID2LABEL)
    if case == "missing folder":
        folder = tmp_path / "nowhere"
    elif case == "empty folder":
        folder = tmp_path / "empty"
        folder.mkdir()
    elif case == "only text":
        folder = tmp_path / "text"
        folder.mkdir()
        (folder / "readme.txt").write_text("hello")
    elif case == "not json":
        id2label = _bad_json(tmp_path, '{"0": "cat",')
    elif case == "json list":
        id2label = _bad_json(tmp_path, '["cat", "dog"]')
    elif case == "empty object":
        id2label = _bad_json(tmp_path, "{}")
    elif case == "non-integer key":
        id2label = _bad_json(tmp_path, '{"0": "dog", "cat": "cat"}')
    elif case == "non-string value":
        id2label = _bad_json(tmp_path, '{"0": "dog", "1": 5}')
    elif case == "duplicate id":
        id2label = _bad_json(tmp_path, '{"1": "dog", "01": "cat"}')
    elif case == "long class name":
        id2label = write_json(tmp_path / "long.json", {"0": "dog", "7": "x" * 500})
    out = tmp_path / "out" / "pred.csv"
    if existing_output:
        out.parent.mkdir()
        out.write_text("old\n")
    with pytest.raises(SystemExit) as exit_info:
        zs.main([str(folder), id2label, str(out)])
    message = str(exit_info.value.code)
    assert expected in message
    if case in ("not json", "json list", "empty object", "non-integer key", "non-string value", "duplicate id"):
        assert id2label in message
    if case in ("missing folder", "empty folder", "only text"):
        assert str(folder) in message
    if existing_output:
        assert out.read_text() == "old\n"
    else:
        assert not out.parent.exists()


@pytest.mark.parametrize("case", ["trailing slash", "under a file", "read-only place"])
def test_output_path_that_cannot_be_written_fails_before_loading(case, tiny_clip_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HW3_P1_CLIP", tiny_clip_file)
    monkeypatch.setattr(zs, "load_clip", lambda *args: pytest.fail("loaded CLIP before checking the output path"))
    folder = save_images(tmp_path / "images", ["a.png"])
    (tmp_path / "file.txt").write_text("x")
    out = {"trailing slash": str(tmp_path / "newdir") + os.sep, "under a file": str(tmp_path / "file.txt" / "p.csv"),
           "read-only place": "/sys/hw3_outputs/pred.csv"}[case]
    if case == "read-only place" and not os.path.isdir("/sys"):
        pytest.skip("no /sys here")
    with pytest.raises(SystemExit) as error:
        zs.main([str(folder), write_json(tmp_path / "id2label.json", ID2LABEL), out])
    assert str(error.value.code).startswith("error: ") and repr(out) in str(error.value.code)
    assert sorted(os.listdir(tmp_path)) == ["file.txt", "id2label.json", "images"]


def test_bad_batch_size(monkeypatch):
    monkeypatch.setenv("HW3_P1_BATCH", "0")
    with pytest.raises(io_utils.InputError, match="HW3_P1_BATCH"):
        zs.batch_size()


def test_image_batch_from_the_override_the_cpu_default_or_free_gpu_memory(tiny_clip_file, monkeypatch):
    monkeypatch.delenv("HW3_P1_BATCH", raising=False)
    model, preprocess = zs.load_clip(tiny_clip_file, torch.device("cpu"))
    models = [(model, preprocess)]
    # the tiny CLIP: 32 px, 8 px patches -> 17 tokens, width 64, one head; two views
    assert zs.image_bytes(model) == 2 * (3 * 32 * 32 * 6 + (7 * 17 * 64 + 2 * 17 ** 2) * 2)
    assert zs.image_batch(models, torch.device("cpu")) == zs.DEFAULT_BATCH
    cuda = torch.device("cuda")
    monkeypatch.setattr(io_utils, "free_cuda_memory", lambda device: 40 * zs.image_bytes(model))
    assert zs.image_batch(models, cuda) == int(40 * zs.MEMORY_SHARE)
    monkeypatch.setattr(io_utils, "free_cuda_memory", lambda device: 10 ** 15)
    assert zs.image_batch(models, cuda) == zs.MAX_CUDA_BATCH
    monkeypatch.setenv("HW3_P1_BATCH", "5")
    assert zs.image_batch(models, cuda) == 5


def test_clip_is_built_without_random_initialisation(tiny_clip_file, monkeypatch):
    """load_clip skips CLIP's random initialisation (weights.skip_init): no layer initialises
    itself and no initialiser runs, and every tensor equals the file's."""
    calls = []
    for owner, name in ((torch.nn.Linear, "reset_parameters"), (torch.nn.init, "normal_")):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    model, _ = zs.load_clip(tiny_clip_file, torch.device("cpu"))
    assert calls == []
    torch.nn.Linear(2, 2)
    assert calls == ["reset_parameters"]  # the counting works, and initialisation is back
    reference, _ = clip.load(tiny_clip_file, device="cpu", jit=False)  # built the ordinary way
    state = reference.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_clip_off_the_cpu_holds_the_dtypes_clip_load_gives_it(tiny_clip_file):
    """Off the CPU clip.load keeps the layers clip.model.convert_weights names in fp16, the rest in
    fp32. load_clip runs that conversion on a model without data, then puts the weights in: the
    dtypes must be clip.load's (the meta device stands in for a GPU, where no cast to fp32 follows)."""
    import clip_weights
    from clip.model import CLIP, convert_weights

    state = clip_weights.read_state(tiny_clip_file, tiny_clip_file)
    model = clip_weights.build(state, tiny_clip_file, torch.device("meta"))
    reference = CLIP(**clip_weights.architecture(state, tiny_clip_file))
    convert_weights(reference)
    dtypes = {name: t.dtype for name, t in reference.state_dict().items()}
    assert {name: t.dtype for name, t in model.state_dict().items()} == dtypes
    assert {torch.float16, torch.float32} <= set(dtypes.values())
    assert {t.device.type for t in model.state_dict().values()} == {"meta"}


# ---------------------------------------------------------------- report helper

def test_report_accuracy_equals_direct_counts(tiny_clip_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HW3_P1_CLIP", tiny_clip_file)
    keys = list(ID2LABEL)
    names = [f"{keys[i % len(keys)]}_{450 + i}.png" for i in range(8)]
    folder = save_images(tmp_path / "val", names)
    id2label = write_json(tmp_path / "id2label.json", ID2LABEL)
    out = tmp_path / "report"
    p1_report.main(["accuracy", "--val-dir", str(folder), "--id2label", id2label,
                    "--out-dir", str(out), "--clip", tiny_clip_file])

    report = json.loads((out / "p1_prompts.json").read_text())
    assert report["models"] == [tiny_clip_file] and report["n_images"] == 8
    results = report["results"]
    assert [r["prompt"] for r in results] == [
        "This is a photo of {object}", "This is not a photo of {object}",
        "No {object}, no score.", p1_report.ENSEMBLE_NAME]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in results)
    table = [line for line in (out / "p1_prompts.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 4

    # The ensemble row counts what the graders' entry point writes.
    zs.main([str(folder), id2label, str(tmp_path / "pred.csv")])
    rows = read_csv(tmp_path / "pred.csv")[1:]
    correct = sum(name.split("_")[0] == label for name, label in rows)
    assert results[3]["accuracy"] == correct / len(rows)

    class_ids = sorted(int(k) for k in ID2LABEL)
    paths = sorted(folder.iterdir())
    truth = [int(p.name.split("_")[0]) for p in paths]
    for row, prompt in zip(results, p1_report.REPORT_PROMPTS + [None]):
        templates = zs.TEMPLATES if prompt is None else [prompt]
        probs = direct_probs(tiny_clip_file, paths, [ID2LABEL[str(i)] for i in class_ids], templates)
        predicted = [class_ids[int(k)] for k in probs.argmax(dim=1)]
        assert row["accuracy"] == sum(p == t for p, t in zip(predicted, truth)) / len(truth)


def test_report_accuracy_rejects_names_without_label(tiny_clip_file, tmp_path):
    folder = save_images(tmp_path / "val", ["0_1.png", "cat.png", "99_2.png"])
    id2label = write_json(tmp_path / "id2label.json", ID2LABEL)
    with pytest.raises(SystemExit) as exit_info:
        p1_report.main(["accuracy", "--val-dir", str(folder), "--id2label", id2label,
                        "--out-dir", str(tmp_path / "out"), "--clip", tiny_clip_file])
    message = str(exit_info.value.code)
    assert "'cat.png'" in message and "'99_2.png'" in message and "'0_1.png'" not in message
    assert not (tmp_path / "out").exists()


def test_report_top5_writes_a_png_per_image(tiny_clip_file, tmp_path):
    folder = save_images(tmp_path / "val", ["3_450.png", "café shop.png"])
    id2label = write_json(tmp_path / "id2label.json", ID2LABEL)
    out = tmp_path / "figs"
    report = p1_report.main(["top5", "--id2label", id2label, "--out-dir", str(out), "--clip", tiny_clip_file,
                             str(folder / "3_450.png"), str(folder / "café shop.png")])
    for stem in ("3_450", "café shop"):
        assert (out / f"p1_top5_{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    numbers = json.loads((out / "p1_top5.json").read_text(encoding="utf-8"))
    assert numbers == report
    for rows in numbers["images"].values():
        probs = [r["probability"] for r in rows]
        assert len(rows) == 4 and probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-5
        assert all(r["prompt"] == "a photo of a " + zs.clean_classname(r["class"]) for r in rows)


def test_report_top5_picks_three_classes_the_same_every_run(tiny_clip_file, tmp_path):
    """--pick-from: three different classes (the first three names, 0_450..0_452, were all one class)."""
    names = ["0_450.png", "0_451.png", "0_452.png", "11_450.png", "3_452.png", "3_450.png", "4_451.png",
             "cat.png"]
    folder = save_images(tmp_path / "val", names)
    picked = [os.path.basename(p) for p in p1_report.pick_images(str(folder))]
    assert picked == ["0_450.png", "3_450.png", "4_451.png"]  # labels 0 3 4 11: the 1st, 2nd, 3rd of 4
    assert len({p1_report.label_from_name(n) for n in picked}) == 3
    id2label = write_json(tmp_path / "id2label.json", ID2LABEL)
    report = p1_report.main(["top5", "--id2label", id2label, "--out-dir", str(tmp_path / "figs"),
                             "--clip", tiny_clip_file, "--pick-from", str(folder)])
    assert list(report["images"]) == picked
    many = save_images(tmp_path / "many", [f"{label}_{i}.png" for label in range(50) for i in (450, 451)])
    assert [os.path.basename(p) for p in p1_report.pick_images(str(many))] == ["0_450.png", "16_450.png",
                                                                            "33_450.png"]


def test_report_top5_pick_needs_three_named_classes(tmp_path):
    folder = save_images(tmp_path / "val", ["0_450.png", "0_451.png", "3_450.png", "cat.png"])
    id2label = write_json(tmp_path / "id2label.json", ID2LABEL)
    with pytest.raises(SystemExit, match="2 class\\(es\\) among the file names .*3 needed"):
        p1_report.main(["top5", "--id2label", id2label, "--out-dir", str(tmp_path / "out"),
                        "--pick-from", str(folder)])
    with pytest.raises(SystemExit) as stop:
        p1_report.main(["top5", "--id2label", "x.json", "--out-dir", str(tmp_path / "out")])
    assert stop.value.code == 2  # neither images nor --pick-from


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


@pytest.mark.parametrize("command", ["accuracy", "top5"])
def test_report_out_dir_that_cannot_be_written_fails_before_loading(command, tiny_clip_file, tmp_path, monkeypatch):
    monkeypatch.setattr(p1_report, "Classifier", lambda *args: pytest.fail("CLIP loaded before the path check"))
    folder = save_images(tmp_path / "val", ["0_1.png"])
    id2label = write_json(tmp_path / "id2label.json", ID2LABEL)
    (tmp_path / "a_file").write_text("x")
    extra = ["--val-dir", str(folder)] if command == "accuracy" else [str(folder / "0_1.png")]
    with pytest.raises(SystemExit, match="--out-dir.*is not a folder"):
        p1_report.main([command, "--id2label", id2label, "--out-dir", str(tmp_path / "a_file" / "out"),
                        "--clip", tiny_clip_file, *extra])


# ---------------------------------------------------------------- CSV rows for any legal name

HOSTILE_NAMES = ["carriage\rreturn.png", "line\nfeed.png", "both\r\nends.png", "\rstarts.png", "ends\r",
                 "comma,name.png", 'say "hi".png', "  leading spaces.png", "trailing spaces.png  ",
                 "'single'.png", "tab\tname.png", '",\r\n".png', "plain.png"]


def test_predictions_csv_reads_back_in_pandas_as_exactly_the_names_given(tmp_path):
    import pandas

    labels = list(range(len(HOSTILE_NAMES)))
    out = tmp_path / "pred.csv"
    zs.file_io.atomic_write_text(str(out), zs.predictions_csv(HOSTILE_NAMES, labels))
    table = pandas.read_csv(out)
    assert list(table.columns) == ["filename", "label"]
    assert sorted(zip(table["filename"], table["label"])) == sorted(zip(HOSTILE_NAMES, labels))
    assert read_csv(out)[1:] == sorted([name, str(label)] for name, label in zip(HOSTILE_NAMES, labels))


def test_hw3_1_rows_of_images_with_line_breaks_in_their_names_read_back_in_pandas(tiny_clip_file, tmp_path,
                                                                                  monkeypatch):
    import pandas

    monkeypatch.setenv("HW3_P1_CLIP", tiny_clip_file)
    monkeypatch.setenv("HW3_CACHE", str(tmp_path / "cache"))
    names = [n for n in HOSTILE_NAMES if "/" not in n]
    folder = tmp_path / "images"
    folder.mkdir()
    for seed, name in enumerate(names):
        noise_image(seed).save(folder / name, format="PNG")
    out = tmp_path / "pred.csv"
    zs.main([str(folder), write_json(tmp_path / "id2label.json", ID2LABEL), str(out)])
    table = pandas.read_csv(out)
    assert sorted(table["filename"]) == sorted(names)
    assert set(table["label"]) <= {int(k) for k in ID2LABEL}


# ---------------------------------------------------------------- outputs: inputs spared, long names, a full disk

@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
@pytest.mark.parametrize("victim", ["ID2LABEL", "an image in IMG_DIR", "HW3_P1_CLIP"])
def test_an_output_that_is_an_input_is_refused_before_any_work(tiny_clip_file, tmp_path, monkeypatch, victim, how):
    import shutil

    monkeypatch.setattr(zs, "load_clip", lambda *args: pytest.fail("loaded CLIP before the check"))
    folder = save_images(tmp_path / "images", ["a.png", "b.png"])
    inputs = {"ID2LABEL": tmp_path / "id2label.json", "an image in IMG_DIR": folder / "b.png",
              "HW3_P1_CLIP": tmp_path / "clip.pt"}
    write_json(inputs["ID2LABEL"], ID2LABEL)
    shutil.copy(tiny_clip_file, inputs["HW3_P1_CLIP"])
    monkeypatch.setenv("HW3_P1_CLIP", str(inputs["HW3_P1_CLIP"]))
    before = {path: path.read_bytes() for path in inputs.values()}
    out = inputs[victim]
    if how != "same":
        out = tmp_path / "link.csv"
        out.symlink_to(inputs[victim]) if how == "symlink" else os.link(inputs[victim], out)
    with pytest.raises(SystemExit) as error:
        zs.main([str(folder), str(inputs["ID2LABEL"]), str(out)])
    assert str(error.value.code).startswith(f"error: OUT_CSV {str(out)!r} is the input ")
    assert {path: path.read_bytes() for path in inputs.values()} == before


def test_an_output_that_is_a_cached_clip_model_is_refused(tmp_path, monkeypatch):
    from clip_weights import cached_path

    monkeypatch.setenv("HW3_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HW3_P1_CLIP", "ViT-B/32")
    monkeypatch.setattr(zs, "load_clip", lambda *args: pytest.fail("loaded CLIP before the check"))
    cached = cached_path("ViT-B/32")
    os.makedirs(os.path.dirname(cached))
    with open(cached, "wb") as f:
        f.write(b"weights")
    folder = save_images(tmp_path / "images", ["a.png"])
    with pytest.raises(SystemExit, match="is the input CLIP model ViT-B/32"):
        zs.main([str(folder), write_json(tmp_path / "id2label.json", ID2LABEL), cached])
    assert open(cached, "rb").read() == b"weights"


@pytest.mark.parametrize("name", ["p" * 246 + ".csv", "é" * 123 + ".csv"], ids=["ascii", "utf8"])
def test_hw3_1_writes_an_output_with_a_250_byte_name(tiny_clip_file, tmp_path, monkeypatch, name):
    assert len(os.fsencode(name)) == 250
    monkeypatch.setenv("HW3_P1_CLIP", tiny_clip_file)
    monkeypatch.setenv("HW3_CACHE", str(tmp_path / "cache"))
    folder = save_images(tmp_path / "images", ["a.png"])
    (tmp_path / "out").mkdir()
    zs.main([str(folder), write_json(tmp_path / "id2label.json", ID2LABEL), str(tmp_path / "out" / name)])
    assert os.listdir(tmp_path / "out") == [name]
    assert read_csv(tmp_path / "out" / name)[1][0] == "a.png"


def test_hw3_1_on_a_full_disk_keeps_the_old_output_and_says_so_in_one_line(tiny_clip_file, tmp_path, monkeypatch):

    monkeypatch.setenv("HW3_P1_CLIP", tiny_clip_file)
    monkeypatch.setenv("HW3_CACHE", str(tmp_path / "cache"))
    folder = save_images(tmp_path / "images", ["a.png"])
    out = tmp_path / "pred.csv"
    out.write_text("old\n")
    disk_full(monkeypatch)
    with pytest.raises(SystemExit) as error:
        zs.main([str(folder), write_json(tmp_path / "id2label.json", ID2LABEL), str(out)])
    message = str(error.value.code)
    assert message.startswith("error: no space left on ") and message.endswith(f" writing {out} (1 MB needed)")
    assert "\n" not in message
    assert out.read_text() == "old\n" and sorted(os.listdir(tmp_path)) == ["id2label.json", "images", "pred.csv"]


@pytest.mark.parametrize("victim", ["id2label", "image", "clip"])
def test_report_refuses_an_output_that_is_an_input_before_loading(victim, tiny_clip_file, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(p1_report, "Classifier", lambda *args: pytest.fail("CLIP loaded before the check"))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    image = save_images(tmp_path / "val", ["0_1.png"]) / "0_1.png"
    id2label = tmp_path / "id2label.json"
    write_json(id2label, ID2LABEL)
    clip_file = tmp_path / "clip.pt"
    shutil.copy(tiny_clip_file, clip_file)
    victims = {"id2label": (id2label, "p1_top5.json"), "image": (image, "p1_top5_0_1.png"),
               "clip": (clip_file, "p1_top5.json")}
    path, name = victims[victim]
    before = path.read_bytes()
    (out_dir / name).symlink_to(path)
    with pytest.raises(SystemExit) as error:
        p1_report.main(["top5", "--id2label", str(id2label), "--out-dir", str(out_dir), "--clip", str(clip_file),
                        str(image)])
    assert str(error.value.code).startswith(f"error: --out-dir {name} ") and "is the input" in str(error.value.code)
    assert path.read_bytes() == before


@pytest.mark.parametrize("name", ["x" * 246 + ".png", "é" * 123 + ".png"], ids=["ascii250", "utf8x2"])
def test_report_refuses_a_chart_name_beyond_name_max_before_loading(name, tmp_path, monkeypatch):
    """A legal 250-byte image name makes p1_top5_<stem>.png longer than NAME_MAX: one line before CLIP
    loads, never a traceback at the save after the work."""
    monkeypatch.setattr(p1_report, "Classifier", lambda *args: pytest.fail("CLIP loaded before the check"))
    image = save_images(tmp_path / "val", [name]) / name
    id2label = write_json(tmp_path / "id2label.json", ID2LABEL)
    with pytest.raises(SystemExit) as error:
        p1_report.main(["top5", "--id2label", id2label, "--out-dir", str(tmp_path / "out"), str(image)])
    message = str(error.value.code)
    assert message.startswith("error: --out-dir p1_top5_") and "bytes long; the file system takes at most" in message
    assert not (tmp_path / "out").exists()
