"""Build the homework 3 report PDF from the result files alone.

    python3 build_report.py [--results outputs] [--notes report_notes.md] [--out hw3_report.pdf]
                            [--checkpoint RUN=PATH ...] [--best-checkpoint PATH] [--attention-dir DIR] [--synthetic]

No number is typed here: every number is read from a file the experiments
wrote into the results folder. A file that is not there yet prints as
"not measured", an empty figure slot names the command that draws it, and
the last page lists every file looked for. The free-text answers come from
the notes file, one `## ` section per question (NOTES_SECTIONS); a section
still empty prints as "(to be written after the results are in)".
`--synthetic` says on page 1 that the numbers come from synthetic data and
tiny random models (the offline demo). Laid out by fpdf2, A4 portrait.
What is still missing (a result file, a value, a notes section, the student's
name) is also recorded in the PDF itself with the command or edit that fills
it (report_record.py), where selfcheck.py reads it back: a report with a gap is
not ready to hand in.

The results folder (--results DIR), file by file:

  p1_prompts.json               p1_report.py accuracy --out-dir DIR
  p1_top5.json, p1_top5_<stem>.png
                                p1_report.py top5 --out-dir DIR --pick-from VAL_DIR (or IMG1 IMG2 IMG3)
  p2_metrics_<run>.json         p2_evaluate.py ... --metrics-out DIR/p2_metrics_<run>.json
  p2_metrics_baseline.json      optional: the same for the language-model-only captions (the
                                untrained model); a row of the runs table when present
  p2_ckpt_<run>.txt             one line: the path of <run>'s checkpoint (a relative
                                path is taken from the current directory)
  p2_per_image.json             p2_evaluate.py ... --per-image DIR/p2_per_image.json (best run)
  attention.json, attention_<stem>.png, attention_top1_<key>.png, attention_last1_<key>.png
                                p2_attention.py --out-dir DIR (or --attention-dir elsewhere)

where <run> is `best` (the submitted model) or one of the PEFT runs `none`,
`adapter`, `prefix`, `lora`. `--checkpoint RUN=PATH` overrides p2_ckpt_<run>.txt
(`--best-checkpoint PATH` is `--checkpoint best=PATH`). A run's setting is
read from its checkpoint's config, its trainable count from the saved
tensors, its validation-CIDEr curve from the `<checkpoint>.log.jsonl` that
p2_train.py writes beside it (when there).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import glob
import json
import math
import os
import re
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from fpdf import FPDF  # noqa: E402
from fpdf.fonts import FontFace  # noqa: E402
from matplotlib import font_manager, ft2font  # noqa: E402
from PIL import Image  # noqa: E402

import report_record  # noqa: E402
import file_io  # noqa: E402
from file_io import atomic_output, check_output_path, check_outputs_spare_inputs  # noqa: E402
from io_utils import InputError, quiet_known_warnings, reports_input_errors, warn

NOT_MEASURED = "not measured"
TO_BE_WRITTEN = "(to be written after the results are in)"
STUDENT_PLACEHOLDER = "name / ID"  # report_notes.md's '## Student' as shipped
SYNTHETIC_NOTICE = ("Synthetic data: every number and figure in this report comes from synthetic data and tiny "
                    "randomly initialised models (the offline demo, make demo), not from the course data. It shows "
                    "that the whole workflow runs, not how well the homework's models do.")
NOTES_SECTIONS = {  # the notes file's sections: key -> heading (after "## "), fixed so the report finds them
    "student": "Student", "p1_zero_shot": "P1 why CLIP works zero-shot", "p1_prompts": "P1 prompt discussion",
    "p2_best": "P2 best setting remarks", "p2_peft": "P2 PEFT comparison", "p2_attention": "P2 attention analysis"}
RUNS = ("best", "none", "adapter", "prefix", "lora")
PEFT_RUNS = RUNS[1:]
ATTENTION_IMAGES = ("bike", "girl", "sheep", "ski", "umbrella")  # p3_data/images/<stem>.jpg

# How each result file is made; {dir} is the results folder, {att} the attention folder, {run} a run name.
P1_ACCURACY_CMD = ("python3 p1_report.py accuracy --val-dir hw3_data/p1_data/val "
                   "--id2label hw3_data/p1_data/id2label.json --out-dir {dir}")
P1_TOP5_CMD = ("python3 p1_report.py top5 --id2label hw3_data/p1_data/id2label.json --out-dir {dir} "
               "--pick-from hw3_data/p1_data/val")
P2_EVAL_CMD = ("HW3_P2_CKPT=CKPT python3 p2_inference.py hw3_data/p2_data/images/val PRED.json "
               "hw3_data/p2_data/decoder_model.bin; then python3 p2_evaluate.py --pred_file PRED.json --images_root "
               "hw3_data/p2_data/images/val --annotation_file hw3_data/p2_data/val.json "
               "--metrics-out {dir}/p2_metrics_{run}.json")
P2_PER_IMAGE_CMD = P2_EVAL_CMD.replace("{run}", "best") + " --per-image {dir}/p2_per_image.json"
P2_CKPT_CMD = "echo CKPT > {dir}/p2_ckpt_{run}.txt  (or build_report.py --checkpoint {run}=CKPT)"
P2_ATTENTION_CMD = ("python3 p2_attention.py --images hw3_data/p3_data/images/*.jpg --out-dir {att} "
                    "--checkpoint CKPT --decoder-weights hw3_data/p2_data/decoder_model.bin")
P2_EXTREMES_CMD = ("python3 p2_attention.py --per-image {dir}/p2_per_image.json --images-root "
                   "hw3_data/p2_data/images/val --out-dir {att} --checkpoint CKPT "
                   "--decoder-weights hw3_data/p2_data/decoder_model.bin")

FONT_DIR = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")  # DejaVu Sans ships with matplotlib
BODY, SMALL, HEADING = 10.0, 8.5, {1: 15.0, 2: 12.5}  # points
LIST_ITEM = re.compile(r"(\d+\.|[-*]) ")  # a markdown list item's marker


def line(size: float) -> float:
    """Line height in mm of text of `size` points."""
    return size * 1.4 * 25.4 / 72


def fmt_score(value) -> str:  # CIDEr or CLIPScore, e.g. 0.9123
    return NOT_MEASURED if value is None else f"{value:.4f}"


def fmt_accuracy(value) -> str:  # a fraction as p1_report.py's table writes it, e.g. 61.23%
    return NOT_MEASURED if value is None else f"{value:.2%}"


def fmt_count(value) -> str:  # a parameter count, e.g. 12,345,678 (12.35M)
    return NOT_MEASURED if value is None else f"{value:,d} ({value / 1e6:.2f}M)"


def fmt_number(value) -> str:  # a hyper-parameter: ints as ints, floats without trailing zeros
    return f"{value:g}" if isinstance(value, float) else str(value)


@functools.lru_cache(maxsize=None)
def font_chars(path: str) -> frozenset:
    try:
        return frozenset(ft2font.FT2Font(path).get_charmap())
    except (OSError, RuntimeError):
        return frozenset()


def font_with(char: str):
    """A font file on this machine that draws `char` (matplotlib's last-resort font, boxes naming the
    character's block, only when no real font has it), or None."""
    paths = {f.fname for f in font_manager.fontManager.ttflist if f.fname.lower().endswith((".ttf", ".otf", ".ttc"))}
    paths = sorted(paths, key=lambda p: ("lastresort" in p.lower(), p))
    return next((p for p in paths if ord(char) in font_chars(p)), None)


class Report(FPDF):
    """An A4 document in DejaVu Sans; a character it lacks (a name in Chinese) comes from another font."""

    def __init__(self, footer: str, tmp: str):
        super().__init__(format="A4")
        self.footer_text, self.tmp, self.checked, self.fallbacks = footer, tmp, set(), []
        self.placeholders = 0  # texts laid out as NOT_MEASURED (page 1's explanation of the term aside)
        for style, suffix in (("", ""), ("B", "-Bold"), ("I", "-Oblique"), ("BI", "-BoldOblique")):
            self.add_font("sans", style, os.path.join(FONT_DIR, f"DejaVuSans{suffix}.ttf"))
        self.add_font("mono", "", os.path.join(FONT_DIR, "DejaVuSansMono.ttf"))
        self.add_font("mono", "B", os.path.join(FONT_DIR, "DejaVuSansMono-Bold.ttf"))
        self.set_margins(19, 19)
        self.set_auto_page_break(True, 19)

    def footer(self) -> None:
        self.set_y(-13)
        self.para(f"{self.footer_text} | page {self.page_no()}", SMALL - 1, color=100, align="C")

    def normalize_text(self, text: str) -> str:
        """fpdf2 hands every string through here before laying it out: where a missing glyph gets a font,
        and where a placeholder is counted."""
        self.placeholders += text.replace(f"printed as '{NOT_MEASURED}'", "").count(NOT_MEASURED)
        font = self.current_font
        for char in {c for c in text if (font.fontkey, c) not in self.checked}:
            self.checked.add((font.fontkey, char))
            if not char.isspace() and ord(char) not in font.cmap and \
                    not any(ord(char) in self.fonts[name].cmap for name in self.fallbacks):
                path = font_with(char)
                if path is None or "lastresort" in path.lower():
                    warn(f"no font here draws {char!r} (U+{ord(char):04X}), so the PDF shows "
                         f"{'nothing' if path is None else 'a placeholder box'}; install one (e.g. Noto Sans CJK)")
                if path is not None:
                    self.fallbacks.append(f"fallback{len(self.fallbacks)}")
                    self.add_font(self.fallbacks[-1], "", path)
                    self.set_fallback_fonts(self.fallbacks, exact_match=False)
        return super().normalize_text(text)

    def para(self, text: str, size=BODY, style="", color=0, family="sans", indent=0.0, **cell) -> None:
        self.set_font(family, style, size)
        self.set_text_color(color)
        self.set_x(self.l_margin + indent)
        self.multi_cell(0, line(size), text, new_x="LMARGIN", new_y="NEXT", **{"align": "L", **cell})
        self.set_text_color(0)
        self.ln(size * 0.12)

    def heading(self, text: str, level: int = 2) -> None:
        if self.will_page_break(2 * line(HEADING[level]) + 4 * line(BODY)):
            self.add_page()  # never a heading alone at a page's foot
        self.ln(2 if level > 1 else 0)
        self.para(text, HEADING[level], "B")

    def notes(self, notes: dict, key: str) -> None:
        """A notes section: paragraphs (blank-line separated) and `- ` / `1. ` list items."""
        text = notes.get(key)
        if text is None:
            return self.para(f"(section '## {NOTES_SECTIONS[key]}' is missing from the notes file)", style="I")
        if not text or text == TO_BE_WRITTEN:
            return self.para(TO_BE_WRITTEN, style="I", color=90)
        self.set_font("sans", "", BODY)
        for block in text.split("\n\n"):
            items = []
            for raw in block.splitlines():
                if items and not LIST_ITEM.match(raw.strip()):
                    items[-1] += " " + raw.strip()
                else:
                    items.append(raw.strip())
            for item in items:
                marker = LIST_ITEM.match(item)
                if marker:  # the item's text hangs right of its marker
                    self.set_x(self.l_margin + 4)
                    self.cell(6, line(BODY), "\u2022" if marker.group(1) in "-*" else marker.group(1))
                self.multi_cell(0, line(BODY), item[marker.end():] if marker else item, new_x="LMARGIN", new_y="NEXT")
            self.ln(2)

    def grid(self, header: list, rows: list, widths=None, size=SMALL) -> None:
        self.set_font("sans", "", size)
        with self.table(col_widths=widths, text_align="LEFT", line_height=line(size), padding=(0.6, 1.2),
                        headings_style=FontFace(emphasis="BOLD", fill_color=235),
                        borders_layout="SINGLE_TOP_LINE") as t:
            for row in [header] + rows:
                t.row([str(c) for c in row])
        self.ln(2)

    def text_height(self, text, size=BODY, style="") -> float:
        self.set_font("sans", style, size)
        return len(self.multi_cell(0, line(size), text or "", dry_run=True, output="LINES")) * line(size) + size * 0.12

    def figure(self, png, max_height: float, text=None, title=None, missing=("", "")) -> None:
        """Title, text and an image file scaled to the text width (or `max_height` mm), on one page;
        without `png`, a dashed box saying which figure is missing (`missing`: what, command)."""
        height = 22.0  # the box
        if png:
            with Image.open(png) as image:
                width = min(self.epw, max_height * image.width / image.height)
                height = width * image.height / image.width
        if self.will_page_break(self.text_height(title, style="B") + self.text_height(text) + height + 3):
            self.add_page()
        if title:
            self.para(title, style="B")
        if text:
            self.para(text)
        if png:
            self.image(png, x=self.l_margin + (self.epw - width) / 2, w=width, h=height)
            self.ln(3)
        else:
            self.set_dash_pattern(dash=1.5, gap=1.5)
            self.para(f"{missing[0]}: {NOT_MEASURED}. Produced by: {missing[1]}", SMALL, color=80, align="C",
                      border=1, padding=(5, 12))
            self.set_dash_pattern()
            self.ln(2)

    def plot(self, draw, height_in: float, text: str) -> None:
        """A matplotlib plot drawn by `draw(ax)`, as a PNG across the text width."""
        fig, ax = plt.subplots(figsize=(6.5, height_in), layout="constrained")
        draw(ax)
        path = os.path.join(self.tmp, f"plot{len(os.listdir(self.tmp))}.png")
        fig.savefig(path, dpi=200)
        plt.close(fig)
        self.figure(path, height_in * 25.4, text)


def read_notes(path: str) -> dict:
    """The notes file's sections by key; refuses a heading that is not in NOTES_SECTIONS
    (a mistyped heading would silently drop its answer)."""
    key_of = {heading.lower(): key for key, heading in NOTES_SECTIONS.items()}
    sections, key = {}, None
    for text in file_io.read_text(path, "notes file").split("\n"):  # line ends read as "\n"
        if text.startswith("## "):
            key = key_of.get(text[3:].strip().lower())
            if key is None:
                allowed = ", ".join(f"'## {h}'" for h in NOTES_SECTIONS.values())
                raise InputError(f"{path}: unknown section '## {text[3:].strip()}'; allowed: {allowed}")
            sections[key] = []
        elif key is not None:
            sections[key].append(text)
    return {k: "\n".join(lines).strip() for k, lines in sections.items()}


def read_json(path: str, expected: str | None = None, valid=lambda data: True):
    """The JSON at `path`, or None when there is no such file; InputError when it is a folder,
    not JSON (file_io.read_json) or not `expected` (`valid(data)` is false)."""
    if not os.path.lexists(path):
        return None
    data = file_io.read_json(path, "result file")
    if not valid(data):
        raise InputError(f"result file {path!r}: expected {expected}")
    return data


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_list_of(value, valid) -> bool:
    return isinstance(value, list) and all(valid(item) for item in value)


def read_prompts(path: str):
    return read_json(path, '{"models": [...], "n_images", "results": [{"prompt": text, "accuracy": number, '
                     '"per_model": [number, ...] (optional)}, ...]} from p1_report.py accuracy',
                     lambda d: isinstance(d, dict) and (d.get("models") is None or is_list_of(d["models"], str))
                     and is_list_of(d.get("results"), lambda r: isinstance(r, dict) and isinstance(r.get("prompt"), str)
                                    and is_number(r.get("accuracy"))
                                    and (r.get("per_model") is None or is_list_of(r["per_model"], is_number))))


def read_top5(path: str):
    return read_json(path, '{"images": {image name: [{"prompt": text, "probability": number}, ...]}, ...} from '
                     'p1_report.py top5',
                     lambda d: isinstance(d, dict) and (d.get("images") is None or isinstance(d["images"], dict) and all(
                         is_list_of(rows, lambda r: isinstance(r, dict) and isinstance(r.get("prompt"), str)
                                    and is_number(r.get("probability"))) for rows in d["images"].values())))


def is_ranked_row(row) -> bool:
    """A row of p2_evaluate.py's --per-image list (as p2_attention.py records top1 / last1)."""
    return (isinstance(row, dict) and isinstance(row.get("key"), str) and isinstance(row.get("caption"), str)
            and is_number(row.get("clip_score")) and isinstance(row.get("png"), (str, type(None))))


def read_per_image(path: str):
    return read_json(path, '[{"key": text, "caption": text, "clip_score": number}, ...] from p2_evaluate.py '
                     '--per-image', lambda d: is_list_of(d, is_ranked_row))


def read_attention(path: str):
    def valid_entry(name, entry) -> bool:
        if name in ("top1", "last1"):
            return not entry or is_ranked_row(entry)
        return isinstance(entry, dict) and all(isinstance(entry.get(k), (str, type(None))) for k in ("caption", "png"))

    return read_json(path, '{stem: {"caption": text, "png": text, ...}, "top1"/"last1": {"key", "caption", '
                     '"clip_score": number, "png"}} from p2_attention.py',
                     lambda d: isinstance(d, dict) and all(valid_entry(k, v) for k, v in d.items()))


def read_metrics(path: str):
    return read_json(path, '{"cider": finite number|null, "clipscore": finite number|null, ...} from p2_evaluate.py '
                     '--metrics-out', lambda d: isinstance(d, dict) and all(
                         d.get(k) is None or (isinstance(d[k], (int, float)) and math.isfinite(d[k]))
                         for k in ("cider", "clipscore")))


def checkpoint_paths(results: str, overrides: dict) -> dict:
    """run -> checkpoint path: --checkpoint first, else the path in p2_ckpt_<run>.txt."""
    paths = dict(overrides)
    for run in RUNS:
        pointer = os.path.join(results, f"p2_ckpt_{run}.txt")
        if run not in paths and os.path.lexists(pointer):
            lines = [text.strip() for text in file_io.read_text(pointer, "result file").splitlines() if text.strip()]
            if len(lines) != 1:
                raise InputError(f"result file {pointer!r}: expected one line holding a checkpoint path")
            paths[run] = lines[0]
    return {run: paths[run] for run in RUNS if run in paths}


def read_run(run: str, path: str) -> dict:
    """What the report shows of a checkpoint: its config, saved-tensor count and training log."""
    from captioner import read_checkpoint

    if os.path.isdir(path):
        raise InputError(f"the checkpoint of run {run!r}, {path!r}, is a folder; expected a file")
    if not os.path.isfile(path):
        warn(f"checkpoint of run {run!r} not found: {path}")
        return {"path": path, "missing": True}
    try:
        checkpoint = read_checkpoint(path)
    except (ValueError, OSError) as e:
        raise InputError(str(e)) from None
    config = checkpoint["config"]
    encoder, decoder = config.get("encoder"), config.get("decoder")
    if not (isinstance(encoder, dict) and isinstance(encoder.get("name"), str) and isinstance(decoder, dict)
            and isinstance(decoder.get("n_layer", 0), int)):
        raise InputError(f"{path}: its config has no 'encoder' with a 'name' and 'decoder' with 'n_layer' "
                         "as p2_train.py writes them; expected a captioner checkpoint")
    if run in PEFT_RUNS and config.get("peft") != run:
        raise InputError(f"the checkpoint given for the {run!r} run ({path}) was trained with "
                         f"--peft {config.get('peft')!r}")
    return {"path": path, "config": config, "trainable": sum(t.numel() for t in checkpoint["state_dict"].values()),
            "curve": read_curve(path + ".log.jsonl")}


def read_curve(path: str):
    """[(step, val_cider)] from p2_train.py's log, or None without a log.

    A line that is not a JSON object (a run killed mid-write leaves a partial last line; a damaged
    or edited log anything) is skipped with a warning naming the file and line, and so is a
    record whose step or val_cider is not a finite number: the curve is an illustration."""
    if not os.path.isfile(path):
        return None
    points = []
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as error:
        raise InputError(f"cannot read the training log {path!r}: {error.strerror or error}") from None
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):  # not UTF-8 or not JSON (ValueErrors), or absurdly nested
            warn(f"{path}:{number}: not a JSON record, skipped")
            continue
        if not isinstance(record, dict):
            warn(f"{path}:{number}: a JSON {type(record).__name__}, not a record (object), skipped")
            continue
        if "val_cider" not in record:
            continue
        if not (is_number(record.get("step")) and is_number(record["val_cider"])):
            warn(f"{path}:{number}: 'step' and 'val_cider' must be finite numbers, got {record.get('step')!r:.40} "
                 f"and {record['val_cider']!r:.40}, skipped")
            continue
        points.append((record["step"], record["val_cider"]))
    return points or None


def find_png(folder: str, recorded, pattern: str):
    """A figure: the path a JSON recorded (absolute, relative to the current directory or to
    `folder`), else the first file matching `pattern` in `folder`."""
    for candidate in (recorded, os.path.join(folder, recorded), os.path.join(folder, os.path.basename(recorded))) \
            if recorded else ():
        if os.path.isfile(candidate):
            return candidate
    matches = sorted(glob.glob(os.path.join(glob.escape(folder), pattern)))
    return matches[0] if matches else None


class Sources:
    """Where the inputs are, and a record of each result file looked for (the closing checklist)."""

    def __init__(self, results: str, attention_dir: str, notes: dict, runs: dict, synthetic: bool):
        self.results, self.attention_dir, self.notes, self.runs = results, attention_dir, notes, runs
        self.synthetic, self.looked = synthetic, []  # looked: (what, path or None, command)
        self.gaps = []  # (what, how to fill it): values missing from files that are there

    def command(self, template: str, **fields) -> str:
        return template.format(dir=self.results, att=self.attention_dir, **fields)

    def read(self, name: str, template: str, reader=read_json, folder: str | None = None, **fields):
        path = os.path.join(folder or self.results, name)
        data = reader(path)
        self.looked.append((name, path if data is not None else None, self.command(template, **fields)))
        return data

    def gap(self, what: str, template: str, **fields) -> None:
        self.gaps.append((what, self.command(template, **fields)))

    def metrics(self, run: str) -> dict:
        """p2_metrics_<run>.json (or {}); a score it holds as null is a gap."""
        name = f"p2_metrics_{run}.json"
        metrics = self.read(name, P2_EVAL_CMD, read_metrics, run=run)
        for key, label in (("cider", "CIDEr"), ("clipscore", "CLIPScore")):
            if metrics is not None and metrics.get(key) is None:
                self.gap(f"{label} of run {run} ({name} holds null)", P2_EVAL_CMD, run=run)
        return metrics or {}

    def figure(self, what: str, recorded, pattern: str, template: str, folder: str | None = None):
        png = find_png(folder or self.results, recorded, pattern)
        self.looked.append((what, png, self.command(template)))
        return png


def student_line(notes: dict) -> str:
    return " ".join((notes.get("student") or STUDENT_PLACEHOLDER).split())


def model_label(spec: str) -> str:
    """A CLIP model as the table shows it: a name as is (ViT-L/14), a weights file by its name."""
    return os.path.basename(spec) if os.path.splitext(spec)[1] in (".pt", ".pth", ".bin", ".safetensors") else spec


def title_block(doc: Report, src: Sources) -> None:
    doc.add_page()
    doc.para("Deep Learning for Computer Vision (NTU, Fall 2023)", 11, color=80)
    doc.para("Homework 3 report", 20, "B")
    doc.para("Zero-shot classification with CLIP; image captioning with PEFT", 12)
    doc.para(f"Student: {student_line(src.notes)}", BODY + 1)
    doc.para(f"Generated {datetime.date.today().isoformat()} by build_report.py from the result files in "
             f"'{src.results}'. A value printed as '{NOT_MEASURED}' has no result file yet; the last page "
             "lists every file and the command that writes it.", SMALL, color=90)
    if src.synthetic:
        doc.set_draw_color(180, 0, 0)
        doc.para(SYNTHETIC_NOTICE, 11, "B", color=(180, 0, 0), border=1, padding=3)
        doc.set_draw_color(0)
    doc.ln(2)


def problem1(doc: Report, src: Sources) -> None:
    doc.heading("Problem 1: zero-shot image classification with CLIP", 1)
    doc.heading("1. Why CLIP classifies zero-shot")
    doc.notes(src.notes, "p1_zero_shot")

    doc.heading("2. Prompt-text analysis")
    report = src.read("p1_prompts.json", P1_ACCURACY_CMD, read_prompts)
    if report is None:
        from p1_report import ENSEMBLE_NAME, REPORT_PROMPTS

        doc.para("Validation accuracy ({object} is the class name):")
        rows = [[p.replace("{}", "{object}"), NOT_MEASURED] for p in REPORT_PROMPTS] + [[ENSEMBLE_NAME, NOT_MEASURED]]
        doc.grid(["prompt", "accuracy"], rows, (3, 1))
    else:
        models = [model_label(str(m)) for m in report.get("models") or []]
        doc.para(f"Validation accuracy on {report.get('n_images', NOT_MEASURED)} images, CLIP "
                 f"{' + '.join(models) or '(models not recorded)'}, horizontal-flip test-time augmentation "
                 "({object} is the class name):")
        per_model = models if len(models) > 1 else []  # p1_report.py adds per-model accuracies to an ensemble's rows
        rows = [[r["prompt"], fmt_accuracy(r["accuracy"])]
                + [fmt_accuracy(a) for a in (r.get("per_model") or [None] * len(per_model))[:len(per_model)]]
                for r in report["results"]]
        doc.grid(["prompt", "accuracy"] + per_model, rows, (3,) + (1,) * (1 + len(per_model)))
    doc.notes(src.notes, "p1_prompts")

    doc.heading("3. Top-5 similarity probabilities of three validation images")
    top5 = src.read("p1_top5.json", P1_TOP5_CMD, read_top5)
    shown = 0
    for name, rows in ((top5 or {}).get("images") or {}).items():
        stem = os.path.splitext(name)[0]
        png = find_png(src.results, None, f"p1_top5_{glob.escape(stem)}.png") or \
            find_png(src.results, None, f"p1_top5_{glob.escape(name)}.png")
        doc.figure(png, 66, f"{name}: " + "; ".join(f"{r['prompt']} {fmt_accuracy(r['probability'])}" for r in rows),
                   missing=(f"p1_top5_{stem}.png", src.command(P1_TOP5_CMD)))
        shown += 1
    if top5 is None:  # figures without their numbers file
        for png in sorted(glob.glob(os.path.join(glob.escape(src.results), "p1_top5_*.png"))):
            doc.figure(png, 66, os.path.basename(png))
            shown += 1
    if not shown:
        doc.figure(None, 0, missing=("top-5 figures (p1_top5_<image>.png)", src.command(P1_TOP5_CMD)))
    elif shown != 3:
        doc.para(f"({shown} images here; the report asks for three.)", SMALL, "I")


NO_PEFT = "no PEFT module; the cross-attention and its projection train"


def peft_description(decoder: dict) -> str:
    """The PEFT hyper-parameters a decoder config enables (any mix of the three); "" for none."""
    parts = []
    if decoder.get("adapter_dim"):
        layers = decoder.get("adapter_layers")
        parts.append(f"adapter bottleneck {decoder['adapter_dim']} after "
                     f"{' and '.join(decoder.get('adapter_places') or [])} in "
                     + ("every block" if layers is None else "blocks " + ", ".join(map(str, layers))))
    if decoder.get("prefix_len"):
        parts.append(f"prefix of {decoder['prefix_len']} key/value tokens per block")
    if decoder.get("lora_rank"):
        parts.append(f"LoRA rank {decoder['lora_rank']}, alpha {fmt_number(decoder.get('lora_alpha'))}, "
                     f"dropout {fmt_number(decoder.get('lora_dropout', 0.0))}, on "
                     + ", ".join(decoder.get("lora_targets") or []))
    return "; ".join(parts)


def setting_rows(run: dict) -> list:
    """[name, value] rows describing a run's checkpoint."""
    if run.get("missing"):
        return [["checkpoint", f"{run['path']} (file not found)"]]
    config = run["config"]
    encoder, decoder, gen = config["encoder"], config["decoder"], config.get("generation") or {}
    n_layer, cross, kwargs = decoder.get("n_layer"), decoder.get("cross_layers"), encoder.get("model_kwargs") or {}
    beam = gen.get("beam_size")
    return [
        ["checkpoint", run["path"]],
        ["image encoder (frozen)", encoder["name"] + (f" {json.dumps(kwargs)}" if kwargs else "")
         + (f", width {decoder['encoder_width']}" if "encoder_width" in decoder else "")],
        ["text decoder", f"GPT-2, {n_layer} blocks, width {decoder.get('n_embd')}"],
        ["cross-attention", f"every block (0-{n_layer - 1})" if cross is None and n_layer
         else "blocks " + ", ".join(map(str, cross or []))],
        ["PEFT", f"{config.get('peft')}: {peft_description(decoder) or NO_PEFT}"],
        ["trainable parameters", f"{fmt_count(run['trainable'])}, the checkpoint's saved tensors"],
        ["decoding", "not recorded" if not gen else ("greedy" if beam == 1 else f"beam search, beam {beam}")
         + f", at most {gen.get('max_len')} tokens, length penalty {fmt_number(gen.get('length_penalty'))}"],
    ]


def problem2_metrics(doc: Report, src: Sources) -> None:
    doc.heading("Problem 2: image captioning with parameter-efficient fine-tuning", 1)
    doc.heading("1. Best setting and its validation scores")
    m = src.metrics("best")
    doc.para(f"CIDEr {fmt_score(m.get('cider'))} | CLIPScore {fmt_score(m.get('clipscore'))}"
             + (f" on {m['n_images']} validation images" if "n_images" in m else ""), style="B")
    best = src.runs.get("best")
    src.looked.append(("p2_ckpt_best.txt", best and best["path"], src.command(P2_CKPT_CMD, run="best")))
    for name, run in src.runs.items():
        if run.get("missing"):
            src.gap(f"checkpoint of run {name}: {run['path']} does not exist", P2_CKPT_CMD, run=name)
    if best:
        doc.grid(["setting", "value"], setting_rows(best), (1, 3))
    else:
        doc.para(f"Setting: {NOT_MEASURED} (no checkpoint given).")
    doc.notes(src.notes, "p2_best")

    doc.heading("2. PEFT attempts (and no PEFT for reference)")
    rows = []
    for name in PEFT_RUNS:
        m = src.metrics(name)
        run = src.runs.get(name) or {}
        src.looked.append((f"p2_ckpt_{name}.txt", run.get("path"), src.command(P2_CKPT_CMD, run=name)))
        hyper, count = ((peft_description(run["config"]["decoder"]) or NO_PEFT, fmt_count(run["trainable"]))
                        if "config" in run else (NOT_MEASURED, NOT_MEASURED))
        rows.append([name, fmt_score(m.get("cider")), fmt_score(m.get("clipscore")), count, hyper])
    baseline = None  # optional: listed with the result files when it is there
    if os.path.isfile(os.path.join(src.results, "p2_metrics_baseline.json")):
        baseline = src.metrics("baseline")
        rows.append(["language model only", fmt_score(baseline.get("cider")), fmt_score(baseline.get("clipscore")),
                     "0", "untrained: the language model alone"])
    doc.grid(["run", "CIDEr", "CLIPScore", "trainable params", "PEFT hyper-parameters"], rows, (2, 1.6, 1.6, 2.4, 4.5))
    doc.para("Validation scores by p2_evaluate.py; settings and parameter counts from each run's checkpoint.",
             SMALL, color=80)
    for name in PEFT_RUNS:
        if "config" in (src.runs.get(name) or {}):
            doc.para(f"{name}:", SMALL, "B")
            doc.grid(["setting", "value"], setting_rows(src.runs[name])[1:], (1, 3), SMALL - 0.5)
    curves = {}  # label -> points; a run given twice (best is often one of the others) drawn once
    for path in dict.fromkeys(run["path"] for run in src.runs.values() if run.get("curve")):
        names = [name for name, run in src.runs.items() if run["path"] == path]
        curves[" = ".join(names)] = src.runs[names[0]]["curve"]
    if curves:
        def draw(ax):
            for name, points in curves.items():
                ax.plot(*zip(*points), marker="o", markersize=3, label=name)
            ax.set(xlabel="training step", ylabel="validation CIDEr-D")
            ax.grid(alpha=0.3)
            ax.legend()
        doc.plot(draw, 2.8, "Validation CIDEr while training, from p2_train.py's <checkpoint>.log.jsonl (in-process "
                 "CIDEr-D with the validation decoding of p2_train.py, so it can differ from the table):")
    doc.notes(src.notes, "p2_peft")


def problem2_attention(doc: Report, src: Sources) -> None:
    attention = src.read("attention.json", P2_ATTENTION_CMD, read_attention, folder=src.attention_dir) or {}
    doc.heading("3. Cross-attention of each generated word (last decoder block), five test images")
    for stem in ATTENTION_IMAGES:
        entry = attention.get(stem) or {}
        png = src.figure(f"attention_{stem}.png", entry.get("png"), f"attention_{glob.escape(stem)}.png",
                         P2_ATTENTION_CMD, src.attention_dir)
        if png and "caption" not in entry:
            src.gap(f"caption of {stem}.jpg (attention.json has none)", P2_ATTENTION_CMD)
        doc.figure(png, 105, f"caption: {entry.get('caption', NOT_MEASURED)}", f"{stem}.jpg",
                   (f"attention_{stem}.png", src.command(P2_ATTENTION_CMD)))

    doc.heading("4. Top-1 and last-1 validation images by CLIPScore")
    per_image = None  # the ranked list is needed only where p2_attention.py has not recorded top1/last1
    if not all(attention.get(which) for which in ("top1", "last1")):
        per_image = src.read("p2_per_image.json", P2_PER_IMAGE_CMD, read_per_image)
    for which, index, title in (("top1", 0, "Top-1 (highest CLIPScore)"), ("last1", -1, "Last-1 (lowest CLIPScore)")):
        entry = attention.get(which) or (per_image[index] if per_image else None)
        if entry:
            text = f"image {entry['key']}: \u201c{entry['caption']}\u201d | CLIPScore {fmt_score(entry['clip_score'])}"
            name, pattern = f"attention_{which}_{entry['key']}.png", f"attention_{which}_{glob.escape(entry['key'])}.png"
        else:  # which image is not known yet
            text, name, pattern = f"CLIPScore {NOT_MEASURED}", f"attention_{which}_<key>.png", f"attention_{which}_*.png"
        png = src.figure(name, (entry or {}).get("png"), pattern, P2_EXTREMES_CMD, src.attention_dir)
        doc.figure(png, 105, text, title, (name, src.command(P2_EXTREMES_CMD)))

    doc.heading("5. Analysis")
    doc.notes(src.notes, "p2_attention")


def checklist(doc: Report, src: Sources) -> None:
    doc.heading("Result files", 1)
    doc.para(f"What this report read from '{src.results}' (attention figures from '{src.attention_dir}'); "
             "CKPT, PRED.json and IMG are yours to name.", SMALL, color=80)
    groups = {}  # command -> {what: path}, in the order looked for
    for what, path, command in src.looked:
        groups.setdefault(command, {}).setdefault(what, path)
    for command, files in groups.items():
        for what, path in files.items():
            shown = f"{what}  ({path})" if path and what.endswith(".txt") else what
            doc.para(("found    " if path else "MISSING  ") + shown, SMALL, "" if path else "B", family="mono")
        if not all(files.values()):
            doc.para(command, SMALL - 0.5, color=80, family="mono", indent=10)
        doc.ln(1.5)


def report_gaps(src: Sources, notes_path: str, out: str, placeholders: int) -> list:
    """[what, how to fill it] for everything the report still lacks: result files, values, notes."""
    rebuild = f"then rebuild the report: python3 build_report.py --notes {notes_path} --out {out}"
    gaps = []
    for key, heading in NOTES_SECTIONS.items():
        text = src.notes.get(key)
        if key == "student" and student_line(src.notes) == STUDENT_PLACEHOLDER:
            gaps.append([f"Student: {student_line(src.notes)}",
                         f"write your name and student ID under '## {heading}' in {notes_path}, {rebuild}"])
        elif key != "student" and (not text or text == TO_BE_WRITTEN):
            gaps.append([f"'## {heading}': {'missing' if text is None else TO_BE_WRITTEN}",
                         f"write the answer under '## {heading}' in {notes_path}, {rebuild}"])
    gaps += [[f"{NOT_MEASURED}: {what} missing", command] for what, path, command in src.looked if not path]
    gaps += [[f"{NOT_MEASURED}: {what}", command] for what, command in src.gaps]
    unique = list({tuple(g): g for g in gaps}.values())
    if placeholders and not any(what.startswith(NOT_MEASURED) for what, _ in unique):
        unique.append([f"values printed as '{NOT_MEASURED}'", "see the report's last page"])
    return unique


def build(results: str, notes_path: str, out: str, checkpoints: dict, attention_dir: str | None = None,
          synthetic: bool = False) -> int:
    """Write the report to `out` (atomically); returns the page count."""
    notes = read_notes(notes_path)
    runs = {run: read_run(run, path) for run, path in checkpoint_paths(results, checkpoints).items()}
    src = Sources(results, attention_dir or results, notes, runs, synthetic)
    with tempfile.TemporaryDirectory() as tmp:
        doc = Report(f"DLCV HW3 report | {student_line(notes)}", tmp)
        doc.set_title("DLCV HW3 report")
        doc.set_author(student_line(notes))
        title_block(doc, src)
        problem1(doc, src)
        for section in (problem2_metrics, problem2_attention, checklist):
            doc.add_page()
            section(doc, src)
    gaps = report_gaps(src, notes_path, out, doc.placeholders)
    doc.set_creator(report_record.CREATOR)
    doc.set_keywords(report_record.keywords(gaps))
    with atomic_output(out) as tmp:
        doc.output(tmp)
    return doc.pages_count


def parse_checkpoint(value: str):
    run, sep, path = value.partition("=")
    if not sep or run not in RUNS or not path:
        raise argparse.ArgumentTypeError(f"expected RUN=PATH with RUN one of {', '.join(RUNS)}, got {value!r}")
    return run, path


@reports_input_errors
def main(argv=None) -> None:
    quiet_known_warnings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("The results folder"):])
    p.add_argument("--results", default="outputs", help="folder of the result files (default %(default)s)")
    p.add_argument("--attention-dir", help="p2_attention.py's --out-dir (default: the results folder)")
    p.add_argument("--notes", default="report_notes.md",
                   help="free-text answers, one '## ' section per question (default %(default)s)")
    p.add_argument("--out", default="hw3_report.pdf",
                   help="the PDF to write (default %(default)s; the course names it hw3_<studentID>.pdf)")
    p.add_argument("--checkpoint", action="append", type=parse_checkpoint, default=[], metavar="RUN=PATH",
                   help=f"checkpoint of a run ({', '.join(RUNS)}), repeatable; overrides DIR/p2_ckpt_<run>.txt "
                        "(default: the paths in those files)")
    p.add_argument("--best-checkpoint", metavar="PATH",
                   help="same as --checkpoint best=PATH (default: the path in DIR/p2_ckpt_best.txt)")
    p.add_argument("--synthetic", action="store_true",
                   help="say on page 1 that the results come from synthetic data and tiny random models (the demo)")
    args = p.parse_args(argv)
    check_output_path(args.out)
    checkpoints = dict(args.checkpoint)
    if args.best_checkpoint:
        checkpoints["best"] = args.best_checkpoint
    # every file in the results folders may be read, except an earlier report; so are the runs' checkpoints
    # (--checkpoint, else the path in p2_ckpt_<run>.txt) and their training logs
    runs = checkpoint_paths(args.results, checkpoints) if os.path.isdir(args.results) else checkpoints
    check_outputs_spare_inputs({"--out": args.out}, {
        "--results": args.results, "--attention-dir": args.attention_dir, "--notes": args.notes,
        **{f"the checkpoint of run {run!r}": path for run, path in runs.items()},
        **{f"the training log of run {run!r}": path + ".log.jsonl" for run, path in runs.items()}},
        reads_member=lambda path: not path.lower().endswith(".pdf"))
    pages = build(args.results, args.notes, args.out, checkpoints, args.attention_dir, args.synthetic)
    print(f"wrote {args.out} ({pages} pages)")


if __name__ == "__main__":
    main()
