"""p2_attention.py: per-word cross-attention maps, their figures, the CLI and the notebook."""
import ast
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

import io_utils  # noqa: E402
import p2_attention  # noqa: E402
import synthetic  # noqa: E402
from image_io import open_rgb  # noqa: E402
from tokenizer import EOT, BPETokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def loaded(trained_checkpoint, captioning_setup):
    """(model, tokenizer, device) of the tiny trained adapter captioner, on the CPU."""
    return p2_attention.load_model(trained_checkpoint, captioning_setup["decoder_weights"],
                                   captioning_setup["encoder_weights"], device="cpu")


@pytest.fixture(scope="module")
def report_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("p3_data") / "images"
    return synthetic.make_report_images(str(folder), size=64)


def model_input(model, path):
    """(image as the encoder sees it, its image tokens [1, S, W])"""
    image = p2_attention.model_view(open_rgb(path), model.encoder.transform)
    return image, model.encode(model.encoder.transform(image).unsqueeze(0))


def test_word_maps_one_panel_per_word_from_the_step_that_produced_it(loaded, report_images, monkeypatch):
    model, tokenizer, device = loaded
    image, feats = model_input(model, report_images[0])
    generated = []  # the caption's token ids, as word_maps got them (beam search: the checkpoint's decoding)
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: generated.extend(generate(*a, **k)) or generated)
    caption, panels = p2_attention.word_maps(model, tokenizer, image, device)
    words = caption.split()
    assert words, "the trained captioner should say something"
    assert [title for title, _ in panels] == [EOT, *words, EOT]
    assert len(panels) == len(words) + 2
    assert panels[0][1] is None  # the start token is given, not produced: the plain image
    for title, att in panels[1:]:
        assert att.shape == model.encoder.grid == (4, 4), title
        assert np.isfinite(att).all() and (att >= 0).all() and 0 < att.sum() <= 1 + 1e-5, title

    # The convention: token ids[j] is chosen by the query at position j (reading ids[j-1], or the start).
    assert len(generated) == 1
    ids = generated[0]
    att = model.cross_attention(feats, ids).numpy()  # [N + 2, 4, 4]
    groups = p2_attention.word_groups(tokenizer, ids)
    assert [word for word, _ in groups] == words
    for (word, positions), (_, panel) in zip(groups, panels[1:-1]):
        np.testing.assert_allclose(panel, att[positions].mean(0), atol=1e-6, err_msg=word)
    np.testing.assert_allclose(panels[1][1], att[0], atol=1e-6)  # the first word came from reading the start
    np.testing.assert_allclose(panels[-1][1], att[len(ids)], atol=1e-6)  # the step that chose the end token


def test_a_multi_token_word_is_one_panel_with_the_mean_of_its_tokens(loaded, report_images, monkeypatch):
    model, tokenizer, device = loaded
    ids = tokenizer.encode("a man skateboarding down a ramp.")
    pieces = [tokenizer.decode([i]) for i in ids]
    assert pieces[2:4] == [" skate", "boarding"] and pieces[-2:] == [" ramp", "."]
    monkeypatch.setattr(model, "generate", lambda feats, **kwargs: [list(ids)])
    image, feats = model_input(model, report_images[1])

    caption, panels = p2_attention.word_maps(model, tokenizer, image, device)
    assert caption == "a man skateboarding down a ramp."
    assert [t for t, _ in panels] == [EOT, "a", "man", "skateboarding", "down", "a", "ramp.", EOT]
    att = model.cross_attention(feats, ids).numpy()
    np.testing.assert_allclose(panels[3][1], (att[2] + att[3]) / 2, atol=1e-6)  # " skate" + "boarding"
    np.testing.assert_allclose(panels[6][1], (att[6] + att[7]) / 2, atol=1e-6)  # " ramp" + "."
    np.testing.assert_allclose(panels[-1][1], att[len(ids)], atol=1e-6)


def test_word_groups_skip_whitespace_tokens_and_keep_split_characters_whole(bpe_dir):
    tokenizer = BPETokenizer()
    ids = tokenizer.encode("a caf\u00e9 \u2603 bike\n\nx")  # the snowman is split over two tokens
    groups = p2_attention.word_groups(tokenizer, ids)
    assert [w for w, _ in groups] == ["a", "caf\u00e9", "\u2603", "bike", "x"]
    assert groups[2][1] == [2, 3]
    assert all(tokenizer.decode([ids[p]]).strip() for _, positions in groups for p in positions)


def test_heat_map_keeps_the_patch_layout_and_is_normalised():
    att = np.zeros((4, 4), dtype=np.float32)
    att[0, 3] = 0.7  # top-right patch
    heat = p2_attention.heat_map(att, 64, 64)
    assert heat.shape == (64, 64) and heat.min() == 0.0 and heat.max() == pytest.approx(1.0)
    row, col = np.unravel_index(heat.argmax(), heat.shape)
    assert row < 16 and col >= 48
    assert not p2_attention.heat_map(np.full((4, 4), 0.1), 8, 8).any()  # flat map: no spurious colour


def test_cli_draws_the_five_report_images(loaded, report_images, trained_checkpoint, captioning_setup, tmp_path):
    from PIL import Image

    out = tmp_path / "attention"
    folder = os.path.dirname(report_images[0])
    images = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".jpg"))  # the shell's *.jpg
    cmd = [sys.executable, os.path.join(REPO, "p2_attention.py"), "--images", *images, "--out-dir", str(out),
           "--checkpoint", trained_checkpoint, "--decoder-weights", captioning_setup["decoder_weights"],
           "--encoder-weights", captioning_setup["encoder_weights"], "--beam-size", "1"]
    env = dict(os.environ, MPLBACKEND="Agg", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]

    with open(out / "attention.json", encoding="utf-8") as f:
        records = json.load(f)
    stems = ["bike", "girl", "sheep", "ski", "umbrella"]
    assert sorted(records) == stems
    model, tokenizer, device = loaded
    image, _ = model_input(model, images[0])
    assert records["bike"]["caption"] == p2_attention.word_maps(model, tokenizer, image, device, beam_size=1)[0]
    for stem in stems:
        record = records[stem]
        assert record["png"] == f"attention_{stem}.png"
        assert record["tokens"] == [EOT, *record["caption"].split(), EOT]
        with Image.open(out / record["png"]) as png:
            png.load()
            size, colours = png.size, len(png.convert("RGB").getcolors(1 << 20) or ())
        n = len(record["tokens"])
        columns, rows = min(p2_attention.COLUMNS, n), -(-n // p2_attention.COLUMNS)
        assert size == (columns * p2_attention.PANEL_PX,
                        p2_attention.HEADER_PX + rows * (p2_attention.TITLE_PX + p2_attention.PANEL_PX))
        assert colours > 100, "the heat maps should be drawn, not a blank figure"
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_cli_per_image_draws_top1_and_last1(trained_checkpoint, captioning_setup, report_images, tmp_path):
    rows = [  # deliberately not in CLIPScore order
        {"key": "sheep", "caption": "a sheep", "clip_score": 0.61, "cider": 0.4},
        {"key": "girl", "caption": "a girl", "clip_score": 0.93, "cider": 1.2},
        {"key": "ski", "caption": "a skier", "clip_score": 0.22, "cider": 0.1},
    ]
    per_image = tmp_path / "per_image.json"
    per_image.write_text(json.dumps(rows), encoding="utf-8")
    out = tmp_path / "attention"
    out.mkdir()
    (out / "attention.json").write_text(json.dumps({"bike": {"caption": "kept"}}), encoding="utf-8")

    p2_attention.main(["--per-image", str(per_image), "--images-root", os.path.dirname(report_images[0]),
                       "--out-dir", str(out), "--checkpoint", trained_checkpoint, "--beam-size", "1",
                       "--decoder-weights", captioning_setup["decoder_weights"],
                       "--encoder-weights", captioning_setup["encoder_weights"]])

    records = json.loads((out / "attention.json").read_text(encoding="utf-8"))
    assert set(records) == {"bike", "top1", "last1"} and records["bike"] == {"caption": "kept"}
    for rank, row in (("top1", rows[1]), ("last1", rows[2])):
        record = records[rank]
        assert {k: record[k] for k in row} == row  # the scored caption and scores, unchanged
        assert record["png"] == f"attention_{rank}_{row['key']}.png" and (out / record["png"]).is_file()
        assert record["tokens"][0] == record["tokens"][-1] == EOT and len(record["tokens"]) >= 3


def test_cli_refuses_bad_arguments_before_loading(tmp_path):
    with pytest.raises(SystemExit) as error:
        p2_attention.main(["--per-image", "x.json", "--out-dir", str(tmp_path), "--decoder-weights", "b"])
    assert error.value.code == 2  # --per-image without --images-root
    with pytest.raises(SystemExit, match="does not exist"):
        p2_attention.main(["--images", str(tmp_path / "missing.jpg"), "--out-dir", str(tmp_path),
                           "--decoder-weights", "b"])


def test_cli_refuses_a_truncated_image_before_loading(report_images, tmp_path, monkeypatch):
    monkeypatch.setattr(p2_attention, "load_model", lambda *args: pytest.fail("loaded before reading the images"))
    whole = open(report_images[0], "rb").read()
    (tmp_path / "cut.jpg").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(SystemExit) as error:
        p2_attention.main(["--images", report_images[0], str(tmp_path / "cut.jpg"), "--out-dir", str(tmp_path / "out"),
                           "--decoder-weights", "b", "--checkpoint", "c"])
    assert str(error.value.code).startswith(f"error: image {str(tmp_path / 'cut.jpg')!r} cannot be decoded")
    assert not (tmp_path / "out").exists()



def test_cli_refuses_an_absurd_beam_or_an_unwritable_out_dir_before_loading(report_images, tmp_path, monkeypatch,
                                                                            capsys):
    """A beam of 100000 asks for ~240 GB at the first image; an --out-dir under a file fails at the first figure."""
    monkeypatch.setattr(p2_attention, "load_model", lambda *args: pytest.fail("loaded before checking the options"))
    with pytest.raises(SystemExit) as error:
        p2_attention.main(["--images", report_images[0], "--out-dir", str(tmp_path), "--decoder-weights", "b",
                           "--beam-size", "100000"])
    assert error.value.code == 2 and "--beam-size must be within 1..20" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit, match="--out-dir.*is not a folder"):
        p2_attention.main(["--images", report_images[0], "--out-dir", str(tmp_path / "a_file" / "out"),
                           "--decoder-weights", "b", "--checkpoint", "c"])

def test_notebook_is_thin_valid_and_stores_no_outputs():
    with open(os.path.join(REPO, "p2_visualize.ipynb"), encoding="utf-8") as f:
        notebook = json.load(f)
    assert notebook["nbformat"] == 4
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code
    used = set()
    for i, cell in enumerate(code):
        assert cell["outputs"] == [] and cell["execution_count"] is None, f"code cell {i} stores outputs"
        source = "".join(cell["source"])
        tree = ast.parse(compile(source, f"p2_visualize.ipynb cell {i}", "exec", ast.PyCF_ONLY_AST))
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))], "logic goes in the module"
        used |= set(re.findall(r"p2_attention\.(\w+)", source))
    assert {"notebook_inputs", "load_model", "image_stems", "draw_figures"} <= used
    assert all(hasattr(p2_attention, name) for name in used), sorted(used)


def fake_layout(root, data, out, checkpoint="ck.pt", best=True):
    """The files notebook_inputs looks at, under `root` (contents do not matter here)."""
    (root / data / "p2_data").mkdir(parents=True)
    (root / data / "p2_data" / "decoder_model.bin").write_bytes(b"")
    (root / data / "p3_data" / "images").mkdir(parents=True)
    (root / data / "p3_data" / "images" / "bike.jpg").write_bytes(b"")
    (root / out).mkdir(parents=True)
    (root / checkpoint).write_bytes(b"")
    if best:
        (root / out / "p2_ckpt_best.txt").write_text(checkpoint + "\n")


def test_the_notebook_finds_the_workflow_then_the_demo(tmp_path, monkeypatch):
    for name in ("HW3_DATA", "HW3_OUT", "HW3_P2_CKPT", "HW3_CACHE", "HW3_P2_ENCODER_WEIGHTS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(io_utils.InputError, match="HW3_DATA.*HW3_OUT"):
        p2_attention.notebook_inputs(str(tmp_path))
    fake_layout(tmp_path, "demo/hw3_data", "demo/outputs", "demo/checkpoints_lora.pt")
    found = p2_attention.notebook_inputs(str(tmp_path))
    assert found == dict(checkpoint=str(tmp_path / "demo/checkpoints_lora.pt"),
                         decoder_weights=str(tmp_path / "demo/hw3_data/p2_data/decoder_model.bin"),
                         encoder_weights=None, images=[str(tmp_path / "demo/hw3_data/p3_data/images/bike.jpg")],
                         per_image=None, images_root=str(tmp_path / "demo/hw3_data/p2_data/images/val"),
                         out_dir=str(tmp_path / "demo/outputs"), cache=str(tmp_path / "demo/cache"))
    (tmp_path / "demo/outputs/p2_per_image.json").write_text("[]")
    assert p2_attention.notebook_inputs(str(tmp_path))["per_image"] == str(tmp_path / "demo/outputs/p2_per_image.json")

    fake_layout(tmp_path, "hw3_data", "outputs", "checkpoints_adapter.pt")  # the course workflow comes first
    found = p2_attention.notebook_inputs(str(tmp_path))
    assert (found["out_dir"], found["checkpoint"], found["cache"]) == (
        str(tmp_path / "outputs"), str(tmp_path / "checkpoints_adapter.pt"), None)
    monkeypatch.setenv("HW3_P2_CKPT", str(tmp_path / "demo/checkpoints_lora.pt"))
    assert p2_attention.notebook_inputs(str(tmp_path))["checkpoint"] == str(tmp_path / "demo/checkpoints_lora.pt")
    monkeypatch.setenv("HW3_DATA", str(tmp_path / "demo/hw3_data"))
    monkeypatch.setenv("HW3_OUT", str(tmp_path / "elsewhere"))
    found = p2_attention.notebook_inputs(str(tmp_path))
    assert (found["decoder_weights"], found["out_dir"]) == (
        str(tmp_path / "demo/hw3_data/p2_data/decoder_model.bin"), str(tmp_path / "elsewhere"))
    monkeypatch.delenv("HW3_P2_CKPT")
    with pytest.raises(io_utils.InputError, match="no checkpoint at .*set HW3_P2_CKPT"):
        p2_attention.notebook_inputs(str(tmp_path))  # no choice recorded in HW3_OUT, none in the cache


def run_notebook(monkeypatch, env: dict):
    """p2_visualize.ipynb executed headless (nbclient, a fresh python3 kernel, which inherits this
    process's environment) with `env` set (a None value: unset)."""
    import nbclient
    import nbformat

    for name, value in {"MPLBACKEND": "Agg", "CUDA_VISIBLE_DEVICES": "", **env}.items():
        monkeypatch.delenv(name, raising=False) if value is None else monkeypatch.setenv(name, value)
    notebook = nbformat.read(os.path.join(REPO, "p2_visualize.ipynb"), as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": REPO}}).execute()
    return notebook


def check_notebook_outputs(notebook, out_dir, keys):
    """Every figure shown inline and recorded in OUT/attention.json, where build_report.py finds it."""
    import build_report
    import report_record

    shown = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
             if "image/png" in o.get("data", {})]
    assert len(shown) == len(build_report.ATTENTION_IMAGES) + 2
    records = json.loads((out_dir / "attention.json").read_text(encoding="utf-8"))
    assert set(build_report.ATTENTION_IMAGES) | {"top1", "last1"} <= set(records)
    for stem in build_report.ATTENTION_IMAGES:
        assert records[stem]["caption"] and (out_dir / records[stem]["png"]).is_file()
    assert {records["top1"]["key"], records["last1"]["key"]} <= set(keys)
    build_report.build(str(out_dir), os.path.join(REPO, "report_notes.md"), str(out_dir / "r.pdf"), {})
    attention_gaps = [what for what, _ in report_record.read_gaps(str(out_dir / "r.pdf"))
                      if what.startswith(build_report.NOT_MEASURED) and ("attention" in what or "caption" in what)]
    assert attention_gaps == []


def test_the_notebook_runs_headless_and_writes_attention_json_where_the_report_looks(
        trained_checkpoint, captioning_setup, report_images, tmp_path, monkeypatch):
    """A demo-like layout of the tiny trained model: HW3_DATA / HW3_OUT name it, the checkpoint is the
    workflow's choice (OUT/p2_ckpt_best.txt), the encoder file the one it records (no override)."""
    data, out = tmp_path / "hw3_data", tmp_path / "outputs"
    (data / "p2_data" / "images").mkdir(parents=True)
    os.symlink(captioning_setup["decoder_weights"], data / "p2_data" / "decoder_model.bin")
    os.symlink(os.path.join(captioning_setup["data_root"], "images", "val"), data / "p2_data" / "images" / "val")
    os.makedirs(data / "p3_data")
    os.symlink(os.path.dirname(report_images[0]), data / "p3_data" / "images")
    out.mkdir()
    (out / "p2_ckpt_best.txt").write_text(trained_checkpoint + "\n")
    keys = sorted(os.path.splitext(n)[0] for n in os.listdir(data / "p2_data" / "images" / "val"))[:3]
    (out / "p2_per_image.json").write_text(json.dumps(
        [{"key": k, "caption": "a test caption", "clip_score": s} for k, s in zip(keys, (0.9, 0.5, 0.1))]))
    env = {"HW3_DATA": str(data), "HW3_OUT": str(out), "HW3_CACHE": str(tmp_path / "empty_cache"),
           "HW3_P2_CKPT": None, "HW3_P2_ENCODER_WEIGHTS": None}
    check_notebook_outputs(run_notebook(monkeypatch, env), out, keys)


def test_cli_refuses_a_figure_name_beyond_name_max_before_loading(report_images, tmp_path, monkeypatch):
    """A legal 250-byte image name makes attention_<stem>.png longer than NAME_MAX: one line before the
    model loads, never a traceback after the captioning."""
    import shutil

    monkeypatch.setattr(p2_attention, "load_model", lambda *args: pytest.fail("loaded before the check"))
    image = tmp_path / ("x" * 246 + ".png")
    shutil.copy(report_images[0], image)
    (tmp_path / "decoder.bin").write_bytes(b"decoder")
    (tmp_path / "ckpt.pt").write_bytes(b"checkpoint")
    with pytest.raises(SystemExit) as error:
        p2_attention.main(["--images", str(image), "--out-dir", str(tmp_path / "out"), "--decoder-weights",
                           str(tmp_path / "decoder.bin"), "--checkpoint", str(tmp_path / "ckpt.pt")])
    message = str(error.value.code)
    assert message.startswith("error: --out-dir attention_x") and "bytes long; the file system takes" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["long key", "figure is an image read"])
def test_cli_checks_the_per_image_figures_before_loading(report_images, tmp_path, monkeypatch, case):
    """--per-image's top-1 / last-1 figures are outputs too: a legal 250-byte image name makes
    attention_top1_<key>.png too long, and a figure must not replace an image it is drawn from."""
    import shutil

    monkeypatch.setattr(p2_attention, "load_model", lambda *args: pytest.fail("loaded before the check"))
    root = tmp_path / "images"
    root.mkdir()
    top = "k" * 246 if case == "long key" else "best"
    last = "worst" if case == "long key" else f"attention_top1_{top}"  # the same folder is --out-dir below
    shutil.copy(report_images[0], root / f"{top}.jpg")
    shutil.copy(report_images[1], root / f"{last}.png")
    (tmp_path / "per.json").write_text(json.dumps([{"key": top, "caption": "a", "clip_score": 0.9},
                                                   {"key": last, "caption": "b", "clip_score": 0.1}]))
    (tmp_path / "decoder.bin").write_bytes(b"decoder")
    (tmp_path / "ckpt.pt").write_bytes(b"checkpoint")
    before = {p: p.read_bytes() for p in root.iterdir()}
    out_dir = tmp_path / "out" if case == "long key" else root
    with pytest.raises(SystemExit) as error:
        p2_attention.main(["--per-image", str(tmp_path / "per.json"), "--images-root", str(root), "--out-dir",
                           str(out_dir), "--decoder-weights", str(tmp_path / "decoder.bin"), "--checkpoint",
                           str(tmp_path / "ckpt.pt")])
    message = str(error.value.code)
    assert message.startswith("error: --out-dir attention_top1_")
    assert ("bytes long; the file system takes at most" in message if case == "long key" else
            "is the input --images-root" in message), message
    assert {p: p.read_bytes() for p in root.iterdir()} == before


@pytest.mark.parametrize("victim", ["image", "decoder", "checkpoint"])
def test_cli_refuses_an_output_that_is_an_input_before_loading(report_images, tmp_path, monkeypatch, victim):
    monkeypatch.setattr(p2_attention, "load_model", lambda *args: pytest.fail("loaded before the check"))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (tmp_path / "decoder.bin").write_bytes(b"decoder")
    (tmp_path / "ckpt.pt").write_bytes(b"checkpoint")
    stem = os.path.splitext(os.path.basename(report_images[0]))[0]
    path, name = {"image": (report_images[0], f"attention_{stem}.png"),
                  "decoder": (str(tmp_path / "decoder.bin"), "attention.json"),
                  "checkpoint": (str(tmp_path / "ckpt.pt"), f"attention_{stem}.png")}[victim]
    before = open(path, "rb").read()
    os.link(path, out_dir / name) if victim != "image" else (out_dir / name).symlink_to(path)
    with pytest.raises(SystemExit) as error:
        p2_attention.main(["--images", report_images[0], "--out-dir", str(out_dir), "--decoder-weights",
                           str(tmp_path / "decoder.bin"), "--checkpoint", str(tmp_path / "ckpt.pt")])
    assert "is the input" in str(error.value.code) and name in str(error.value.code)
    assert open(path, "rb").read() == before
