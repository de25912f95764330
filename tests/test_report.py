"""build_report.py: the report PDF from an empty results folder and from a full one.

The PDFs are read back with pypdfium2: their text (every number from the
result files must appear exactly as formatted), their embedded images, and
their first pages rendered to pixels (not blank).
The full results folder holds every file build_report.py's docstring names,
so these tests also pin those names (what the Makefile's report target writes).

Every number in FULL_* below is made up: TEST DATA, not a measurement.
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pdfium = pytest.importorskip("pypdfium2")

import build_report  # noqa: E402
import report_record  # noqa: E402
from captioner import make_config  # noqa: E402
from io_utils import InputError  # noqa: E402

# TEST DATA: made-up accuracies, scores and probabilities.
FULL_PROMPTS = {
    "models": ["ViT-L/14@336px", "ViT-B/16"], "n_images": 2500,
    "results": [
        {"prompt": "This is a photo of {object}", "accuracy": 0.6123, "per_model": [0.6011, 0.5432]},
        {"prompt": "This is not a photo of {object}", "accuracy": 0.4207, "per_model": [0.4113, 0.3876]},
        {"prompt": "No {object}, no score.", "accuracy": 0.3391, "per_model": [0.3202, 0.2954]},
        {"prompt": "18 CIFAR templates (ensemble)", "accuracy": 0.8254, "per_model": [0.8021, 0.7688]},
    ],
}
FULL_TOP5 = {name: [{"class_id": i, "class": f"class{i}", "prompt": f"a photo of a class{i}",
                     "probability": p} for i, p in enumerate(probs)]
             for name, probs in {"3_450.png": [0.9137, 0.0412, 0.0101, 0.0057, 0.0021],
                                 "17_471.png": [0.5531, 0.2214, 0.0833, 0.0402, 0.0188],
                                 "42_499.png": [0.3306, 0.3105, 0.1207, 0.0731, 0.0519]}.items()}
FULL_METRICS = {"best": (0.9512, 0.7348), "none": (0.7765, 0.6932), "adapter": (0.9123, 0.7211),
                "prefix": (0.8345, 0.7056), "lora": (0.9278, 0.7290), "baseline": (0.0213, 0.4107)}
FULL_DECODER = {  # what Captioner fills into a checkpoint's decoder config besides the PEFT values
    "none": {},
    "adapter": dict(adapter_dim=96, adapter_places=["attn", "mlp"], adapter_layers=None),
    "prefix": dict(prefix_len=48, prefix_hidden=0),
    "lora": dict(lora_rank=24, lora_alpha=48.0, lora_targets=["attn.c_attn", "mlp.c_fc"], lora_dropout=0.05),
}
FULL_TENSORS = {"none": [(31, 7)], "adapter": [(123, 45), (67,)], "prefix": [(12, 2, 48, 64)], "lora": [(24, 77), (77, 24)]}
FULL_ATTENTION = {stem: f"a test caption for {stem} number {i}" for i, stem in enumerate(build_report.ATTENTION_IMAGES)}
# Outside latin-1 (fpdf2's core fonts): in DejaVu Sans, and one (U+210A) only a fallback font has (STIX, in matplotlib).
FULL_ATTENTION["ski"] = "a 2\u00d73 grid \u2264 \u2212five \u201cquoted\u201d \u210a"
SECTIONS = ("Problem 1: zero-shot image classification with CLIP", "1. Why CLIP classifies zero-shot",
            "2. Prompt-text analysis", "3. Top-5 similarity probabilities of three validation images",
            "Problem 2: image captioning with parameter-efficient fine-tuning",
            "1. Best setting and its validation scores", "2. PEFT attempts",
            "3. Cross-attention of each generated word",
            "4. Top-1 and last-1 validation images by CLIPScore", "5. Analysis", "Result files")
FULL_EXTREMES = {"top1": ("000000060623", "a man riding a bike down a street", 1.0234),
                 "last1": ("2988244398", "a blurry photo of something", 0.3127)}


def pdf_pages(path) -> list:
    """Each page's text, whitespace collapsed (a wrapped line reads on)."""
    doc = pdfium.PdfDocument(path)
    try:
        return [" ".join(page.get_textpage().get_text_range().split()) for page in doc]
    finally:
        doc.close()


def pdf_text(path) -> str:
    return " ".join(pdf_pages(path))


def page_stats(path):
    """(pages, images per page, first two pages rendered as grayscale arrays)."""
    doc = pdfium.PdfDocument(path)
    try:
        images = [len(list(page.get_objects(filter=(pdfium.raw.FPDF_PAGEOBJ_IMAGE,)))) for page in doc]
        renders = [np.asarray(doc[i].render(scale=0.5).to_pil().convert("L")) for i in range(min(2, len(doc)))]
        return len(doc), images, renders
    finally:
        doc.close()


def save_png(path, size, seed):
    rng = np.random.default_rng(seed)  # noise: a figure that renders blank would show
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(path)


def write_json(path, data):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def fake_checkpoint(path, peft):
    """A checkpoint shaped like captioner.save_checkpoint's, with tiny tensors (config of a real size)."""
    config = make_config(peft, cross_layers=[10, 11] if peft == "lora" else None,
                         generation=dict(beam_size=3, max_len=25, length_penalty=0.5))
    config["decoder"].update(FULL_DECODER[peft], n_layer=12, n_embd=768, encoder_width=1024)
    config["decoder"].setdefault("cross_layers", None)
    state = {f"decoder.{peft}.{i}": torch.zeros(shape) for i, shape in enumerate(FULL_TENSORS[peft])}
    torch.save({"config": config, "state_dict": state}, path)
    return sum(int(np.prod(shape)) for shape in FULL_TENSORS[peft])


@pytest.fixture(scope="module")
def empty_pdf(tmp_path_factory):
    root = tmp_path_factory.mktemp("empty")
    (root / "results").mkdir()
    out = root / "report.pdf"
    build_report.main(["--results", str(root / "results"), "--notes", os.path.join(REPO, "report_notes.md"),
                       "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """A results folder with every file the report reads, and the PDF built from it."""
    root = tmp_path_factory.mktemp("full")
    res = root / "results"
    res.mkdir()
    write_json(res / "p1_prompts.json", FULL_PROMPTS)
    write_json(res / "p1_top5.json", {"models": FULL_PROMPTS["models"], "templates": 18, "images": FULL_TOP5})
    for i, name in enumerate(FULL_TOP5):
        save_png(res / f"p1_top5_{os.path.splitext(name)[0]}.png", (270, 90), i)
    for run, (cider, clip) in FULL_METRICS.items():
        write_json(res / f"p2_metrics_{run}.json", {"cider": cider, "clipscore": clip, "n_images": 1789,
                                                    "pred_file": f"{run}.json", "annotation_file": "val.json"})
    counts = {}
    for peft in build_report.PEFT_RUNS:
        ckpt = root / f"{peft}.pt"
        counts[peft] = fake_checkpoint(ckpt, peft)
        (res / f"p2_ckpt_{peft}.txt").write_text(str(ckpt) + "\n")
    with open(str(root / "lora.pt") + ".log.jsonl", "w") as f:
        for step, cider in ((0, 0.01), (500, 0.71), (1000, 0.83)):
            f.write(json.dumps({"step": step, "phase": "xe", "val_cider": cider}) + "\n")
    attention = {}
    for i, (stem, caption) in enumerate(FULL_ATTENTION.items()):
        save_png(res / f"attention_{stem}.png", (500, 300), 10 + i)
        attention[stem] = {"caption": caption, "tokens": caption.split(), "png": str(res / f"attention_{stem}.png")}
    for which, (key, caption, score) in FULL_EXTREMES.items():
        save_png(res / f"attention_{which}_{key}.png", (500, 200), 20)
        attention[which] = {"key": key, "caption": caption, "clip_score": score,
                            "png": f"attention_{which}_{key}.png"}  # a name relative to the folder
    write_json(res / "attention.json", attention)
    notes = root / "notes.md"
    notes.write_text("## Student\n\nTest Student / R00000000\n\n## P1 why CLIP works zero-shot\n\n"
                     "Contrastive pretraining.\n\n## P2 attention analysis\n\nThe maps follow the objects:\n"
                     "- bike: the wheels\n- sheep: the flock\n")
    out = root / "report.pdf"
    build_report.main(["--results", str(res), "--notes", str(notes), "--out", str(out),
                       "--checkpoint", f"best={root / 'lora.pt'}", "--synthetic"])
    return {"pdf": out, "counts": counts, "root": root, "results": res, "notes": notes}


def test_empty_results_build_a_readable_report(empty_pdf):
    text = pdf_text(empty_pdf)
    pages, images, renders = page_stats(empty_pdf)
    assert pages >= 4 and sum(images) == 0
    assert text.count(build_report.NOT_MEASURED) >= 10
    for prompt in ("This is a photo of {object}", "This is not a photo of {object}", "No {object}, no score."):
        assert prompt in text
    assert "contrastive" in text  # the pre-filled conceptual answer
    assert build_report.TO_BE_WRITTEN in text
    assert "python3 p1_report.py top5" in text and "p2_evaluate.py" in text and "p2_attention.py" in text
    assert "Student: name / ID" in text
    for render in renders:  # dark text on a white page
        assert render.min() < 80 and render.max() > 240
        assert 0.01 < (render < 250).mean() < 0.5


def test_every_number_of_the_result_files_is_in_the_report(full):
    text = pdf_text(full["pdf"])
    for row in FULL_PROMPTS["results"]:
        assert row["prompt"] in text
        for value in [row["accuracy"]] + row["per_model"]:
            assert f"{value:.2%}" in text, value
    for rows in FULL_TOP5.values():
        for r in rows:
            assert f"{r['probability']:.2%}" in text
    for cider, clip in FULL_METRICS.values():
        assert f"{cider:.4f}" in text and f"{clip:.4f}" in text
    for count in full["counts"].values():
        assert f"{count:,d}" in text
    for value in ("bottleneck 96", "48 key/value tokens", "rank 24", "alpha 48", "dropout 0.05",
                  "blocks 10, 11", "beam 3", "at most 25 tokens", "length penalty 0.5"):
        assert value in text, value
    for caption in FULL_ATTENTION.values():
        assert caption in text, caption
    for key, caption, score in FULL_EXTREMES.values():
        assert key in text and caption in text and f"{score:.4f}" in text
    assert "Test Student / R00000000" in text
    assert "the wheels" in text and "Contrastive pretraining." in text
    assert text.count(build_report.NOT_MEASURED) == 1  # the title block's explanation of the term


def test_figures_are_embedded(full, empty_pdf):
    pages, images, renders = page_stats(full["pdf"])
    empty_pages, _, _ = page_stats(empty_pdf)
    assert pages > empty_pages
    # three top-5 figures, five attention figures, top-1 and last-1, the validation-CIDEr curves
    assert sum(images) == 3 + 5 + 2 + 1
    assert all(r.std() > 10 for r in renders)


def test_top1_last1_from_the_per_image_list_without_attention_json(full, tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    rows = [{"key": "best_one", "caption": "a clear caption", "clip_score": 0.9876},
            {"key": "middle", "caption": "so so", "clip_score": 0.6},
            {"key": "worst_one", "caption": "a wrong caption", "clip_score": 0.1234}]
    write_json(res / "p2_per_image.json", rows)
    out = tmp_path / "r.pdf"
    build_report.build(str(res), str(full["notes"]), str(out), {})
    text = pdf_text(out)
    assert "best_one" in text and "0.9876" in text and "worst_one" in text and "0.1234" in text
    assert "attention_top1_best_one.png: not measured" in text  # the real key, in the figure's box
    assert "MISSING attention_top1_best_one.png" in text and "MISSING attention_last1_worst_one.png" in text
    assert "<key>" not in text.replace("attention_<stem>.png", "")


def test_notes_sections_are_parsed_and_a_wrong_heading_refused(tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("# title\nignored\n## Student\nA / B\n## P2 PEFT comparison\n\nline one\nline two\n")
    assert build_report.read_notes(str(notes)) == {"student": "A / B", "p2_peft": "line one\nline two"}
    notes.write_text("## P2 PEFT comparisons\ntext\n")
    with pytest.raises(InputError, match="unknown section"):
        build_report.read_notes(str(notes))


def test_the_shipped_notes_file_has_every_section():
    notes = build_report.read_notes(os.path.join(REPO, "report_notes.md"))
    assert set(notes) == set(build_report.NOTES_SECTIONS)
    assert len(notes["p1_zero_shot"]) > 500
    measured = [k for k in build_report.NOTES_SECTIONS if k not in ("student", "p1_zero_shot")]
    assert all(notes[k] == build_report.TO_BE_WRITTEN for k in measured)


def test_a_checkpoint_under_the_wrong_attempt_is_refused(full, tmp_path):
    with pytest.raises(InputError, match="trained with --peft 'lora'"):
        build_report.build(str(tmp_path), str(full["notes"]), str(tmp_path / "r.pdf"),
                           {"adapter": str(full["root"] / "lora.pt")})
    assert not (tmp_path / "r.pdf").exists()


def test_checkpoint_option_syntax():
    assert build_report.parse_checkpoint("lora=/a/b=c.pt") == ("lora", "/a/b=c.pt")
    with pytest.raises(SystemExit):
        build_report.main(["--checkpoint", "bias=x.pt"])


def test_a_metric_that_is_not_finite_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "p2_metrics_best.json"
    path.write_text('{"cider": NaN, "clipscore": 0.7}')  # what json.dump writes for float("nan")
    with pytest.raises(InputError, match="p2_metrics_best.json"):
        build_report.read_metrics(str(path))


def test_an_output_that_is_a_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    def build(*args, **kwargs):
        raise AssertionError("the report was built before its output path was checked")
    monkeypatch.setattr(build_report, "build", build)
    with pytest.raises(SystemExit, match="is a folder"):
        build_report.main(["--results", str(tmp_path / "absent"), "--out", str(tmp_path)])


def test_nothing_left_beside_the_output(full):
    leftovers = [n for n in os.listdir(full["root"]) if n.endswith(".tmp")]
    assert leftovers == []


def test_every_section_is_in_both_reports(full, empty_pdf):
    for pdf in (full["pdf"], empty_pdf):
        text = pdf_text(pdf)
        for section in SECTIONS:
            assert section in text, (pdf, section)
        for peft in build_report.PEFT_RUNS:
            assert f"p2_metrics_{peft}.json" in text  # each run in the closing list of files


def test_the_synthetic_notice_is_on_page_one_only_when_asked(full, empty_pdf):
    assert build_report.SYNTHETIC_NOTICE in pdf_pages(full["pdf"])[0]
    assert "synthetic" not in pdf_text(empty_pdf).lower()


def test_the_language_model_only_row_is_there_with_its_file_and_omitted_without(full, empty_pdf):
    cider, clip = FULL_METRICS["baseline"]
    assert f"language model only {cider:.4f} {clip:.4f}" in pdf_text(full["pdf"])
    assert "found p2_metrics_baseline.json" in pdf_pages(full["pdf"])[-1]  # in the list of files read
    text = pdf_text(empty_pdf)
    assert "language model only" not in text and "p2_metrics_baseline.json" not in text


def test_the_full_report_has_no_missing_glyph(full, capfd, caplog):
    """Every character of the test captions has a font (U+210A from a fallback font): no warning,
    neither ours nor fpdf2's (a logged "missing the following glyphs")."""
    out = full["root"] / "again.pdf"
    build_report.build(str(full["results"]), str(full["notes"]), str(out), {}, synthetic=True)
    assert "draws" not in capfd.readouterr().err
    assert not [r for r in caplog.records if "glyph" in r.getMessage()]
    assert FULL_ATTENTION["ski"] in pdf_text(out)


def test_a_character_no_font_has_is_named_and_the_report_still_built(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(build_report, "font_with", lambda char: None)  # a machine without CJK fonts
    notes = tmp_path / "notes.md"
    notes.write_text("## Student\n\n\u738b\u5c0f\u660e / R00000000\n", encoding="utf-8")
    build_report.build(str(tmp_path), str(notes), str(tmp_path / "r.pdf"), {})
    assert "U+738B" in capfd.readouterr().err
    assert "R00000000" in pdf_text(tmp_path / "r.pdf")


# ---------------------------------------------------------------- gaps: what selfcheck.py reads back


def complete_notes(path):
    path.write_text("".join(f"## {heading}\n\nAn answer for {heading}.\n\n"
                            for heading in build_report.NOTES_SECTIONS.values()).replace(
        "An answer for Student.", "Test Student / R00000000"), encoding="utf-8")
    return path


def test_a_complete_report_records_no_gap_and_passes_the_selfcheck(full, tmp_path):
    import selfcheck

    out = tmp_path / "hw3_r12345678.pdf"
    build_report.build(str(full["results"]), str(complete_notes(tmp_path / "notes.md")), str(out),
                       {"best": str(full["root"] / "lora.pt")})
    assert report_record.read_gaps(str(out)) == []
    assert selfcheck.check_report(str(tmp_path)) == ("PASS", "report PDF", "found hw3_r12345678.pdf")


def test_a_report_with_placeholders_fails_the_selfcheck_with_what_fills_each(empty_pdf, tmp_path):
    """The default build_report.py run (no results, the shipped notes): 'Student: name / ID' and
    'not measured' everywhere; it used to be a WARN ("not tracked by git")."""
    import shutil

    import selfcheck

    shutil.copyfile(empty_pdf, tmp_path / "hw3_r12345678.pdf")
    gaps = dict(report_record.read_gaps(str(tmp_path / "hw3_r12345678.pdf")))
    notes = os.path.join(REPO, "report_notes.md")
    assert gaps["Student: name / ID"].startswith(f"write your name and student ID under '## Student' in {notes}")
    assert "python3 build_report.py" in gaps["Student: name / ID"]
    assert gaps["'## P2 PEFT comparison': " + build_report.TO_BE_WRITTEN].startswith("write the answer under")
    assert gaps["not measured: p1_prompts.json missing"].startswith("python3 p1_report.py accuracy")
    assert gaps["not measured: attention_bike.png missing"].startswith("python3 p2_attention.py")
    result = selfcheck.check_report(str(tmp_path))
    assert result.status == "FAIL" and "hw3_r12345678.pdf is not ready to hand in" in result.message
    assert "  Student: name / ID: write your name" in result.message


def test_a_null_score_and_a_missing_caption_are_gaps_too(full, tmp_path):
    import shutil

    res = tmp_path / "results"
    shutil.copytree(full["results"], res)
    write_json(res / "p2_metrics_adapter.json", {"cider": 0.9, "clipscore": None})  # --no-clipscore
    attention = json.loads((res / "attention.json").read_text(encoding="utf-8"))
    del attention["sheep"]["caption"]
    write_json(res / "attention.json", attention)
    out = tmp_path / "r.pdf"
    build_report.build(str(res), str(complete_notes(tmp_path / "notes.md")), str(out), {})
    gaps = dict(report_record.read_gaps(str(out)))
    assert gaps.pop("not measured: CLIPScore of run adapter (p2_metrics_adapter.json holds null)").endswith(
        f"--metrics-out {res}/p2_metrics_adapter.json")
    assert gaps.pop("not measured: caption of sheep.jpg (attention.json has none)").startswith("python3 p2_attention.py")
    assert set(gaps) == {"not measured: p2_ckpt_best.txt missing"}  # no --checkpoint best=... this time


def test_no_peft_reads_as_such(full):
    text = pdf_text(full["pdf"])
    assert "none: none" not in text and "none (cross-attention" not in text
    assert f"none {FULL_METRICS['none'][0]:.4f} {FULL_METRICS['none'][1]:.4f} " in text
    assert "PEFT none: " + build_report.NO_PEFT in text


@pytest.mark.parametrize("victim", ["notes", "result", "checkpoint"])
def test_an_output_that_is_an_input_is_refused_before_any_work(tmp_path, monkeypatch, victim):
    monkeypatch.setattr(build_report, "build", lambda *args, **kwargs: pytest.fail("built before the check"))
    results = tmp_path / "outputs"
    results.mkdir()
    (results / "p2_metrics_best.json").write_text('{"cider": 1.0, "clipscore": 0.7}')
    (tmp_path / "notes.md").write_text("## P1\n")
    (tmp_path / "ckpt.pt").write_bytes(b"checkpoint")
    path = {"notes": tmp_path / "notes.md", "result": results / "p2_metrics_best.json",
            "checkpoint": tmp_path / "ckpt.pt"}[victim]
    before = path.read_bytes()
    out = tmp_path / "report.pdf"
    out.symlink_to(path)
    with pytest.raises(SystemExit) as error:
        build_report.main(["--results", str(results), "--notes", str(tmp_path / "notes.md"), "--out", str(out),
                           "--best-checkpoint", str(tmp_path / "ckpt.pt")])
    assert str(error.value.code).startswith(f"error: --out {str(out)!r} is the input ")
    assert path.read_bytes() == before


@pytest.mark.parametrize("victim", ["checkpoint", "training log"])
@pytest.mark.parametrize("spelling", ["same", "dotted", "hard link"])
def test_an_output_that_is_a_checkpoint_named_in_the_results_is_refused(tmp_path, monkeypatch, victim, spelling):
    """The runs' checkpoints the report reads through p2_ckpt_<run>.txt (no --checkpoint given) and their
    <checkpoint>.log.jsonl are inputs: writing the PDF over one replaced the submitted model."""
    monkeypatch.setattr(build_report, "build", lambda *args, **kwargs: pytest.fail("built before the check"))
    results = tmp_path / "outputs"
    results.mkdir()
    (tmp_path / "ck").mkdir()
    checkpoint = tmp_path / "ck" / "lora.pt"
    checkpoint.write_bytes(b"checkpoint")
    (tmp_path / "ck" / "lora.pt.log.jsonl").write_text('{"step": 0}\n')
    (results / "p2_ckpt_lora.txt").write_text(f"{checkpoint}\n")
    path = checkpoint if victim == "checkpoint" else tmp_path / "ck" / "lora.pt.log.jsonl"
    before = path.read_bytes()
    out = {"same": path, "dotted": tmp_path / "ck" / "." / path.name, "hard link": tmp_path / "report.pdf"}[spelling]
    if spelling == "hard link":
        os.link(path, out)
    with pytest.raises(SystemExit) as error:
        build_report.main(["--results", str(results), "--out", str(out)])
    assert str(error.value.code).startswith(f"error: --out {str(out)!r} is the input the {victim} of run 'lora' ")
    assert path.read_bytes() == before


def test_an_earlier_report_in_the_results_folder_may_be_replaced(tmp_path, monkeypatch):
    monkeypatch.setattr(build_report, "build", lambda *args, **kwargs: 1)
    results = tmp_path / "outputs"
    results.mkdir()
    (results / "hw3_report.pdf").write_bytes(b"%PDF old")
    build_report.main(["--results", str(results), "--out", str(results / "hw3_report.pdf")])
