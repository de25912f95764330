"""Build the homework 3 report PDF from the result files alone.

    python3 build_report.py [--results outputs] [--notes report_notes.md] [--out hw3_report.pdf]
                            [--checkpoint RUN=PATH ...] [--best-checkpoint PATH] [--attention-dir DIR]

No number is typed here: every number is read from a file the experiments
wrote into the results folder. A file that is not there yet prints as
"not measured", an empty figure slot names the command that draws it, and
the last page lists every file looked for. The free-text answers come from
the notes file, one `## ` section per question (NOTES_SECTIONS); a section
still empty prints as "(to be written after the results are in)". Pure
matplotlib (PdfPages), A4 portrait.

The results folder (--results DIR), file by file:

  p1_prompts.json               p1_report.py accuracy --out-dir DIR
  p1_top5.json, p1_top5_<stem>.png
                                p1_report.py top5 --out-dir DIR IMG1 IMG2 IMG3
  p2_metrics_<run>.json         p2_evaluate.py ... --metrics-out DIR/p2_metrics_<run>.json
  p2_ckpt_<run>.txt             one line: the path of <run>'s checkpoint (a relative
                                path is taken from the current directory)
  p2_per_image.json             p2_evaluate.py ... --per-image DIR/p2_per_image.json (best run)
  attention.json, attention_<stem>.png, attention_top1_<key>.png, attention_last1_<key>.png
                                p2_attention.py --out-dir DIR (or --attention-dir elsewhere)

where <run> is `best` (the submitted model) or one of the PEFT attempts
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
import os
import re
import sys
import tempfile
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402
from matplotlib.font_manager import FontProperties  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.textpath import TextToPath  # noqa: E402
from PIL import Image  # noqa: E402

NOT_MEASURED = "not measured"
TO_BE_WRITTEN = "(to be written after the results are in)"

# The notes file's sections: key -> heading (after "## "), fixed so the report finds them.
NOTES_SECTIONS = {
    "student": "Student",
    "p1_zero_shot": "P1 why CLIP works zero-shot",
    "p1_prompts": "P1 prompt discussion",
    "p2_best": "P2 best setting remarks",
    "p2_peft": "P2 PEFT comparison",
    "p2_attention": "P2 attention analysis",
}
RUNS = ("best", "adapter", "prefix", "lora")
PEFT_RUNS = RUNS[1:]
ATTENTION_IMAGES = ("bike", "girl", "sheep", "ski", "umbrella")  # p3_data/images/<stem>.jpg

# How each result file is made; {dir} is the results folder, {run} a run name.
P1_ACCURACY_CMD = ("python3 p1_report.py accuracy --val-dir hw3_data/p1_data/val "
                   "--id2label hw3_data/p1_data/id2label.json --out-dir {dir}")
P1_TOP5_CMD = "python3 p1_report.py top5 --id2label hw3_data/p1_data/id2label.json --out-dir {dir} IMG1 IMG2 IMG3"
P2_PRED_CMD = ("HW3_P2_CKPT=CKPT python3 p2_inference.py hw3_data/p2_data/images/val PRED.json "
               "hw3_data/p2_data/decoder_model.bin")
P2_EVAL_CMD = ("python3 p2_evaluate.py --pred_file PRED.json --images_root hw3_data/p2_data/images/val "
               "--annotation_file hw3_data/p2_data/val.json --metrics-out {dir}/p2_metrics_{run}.json")
P2_PER_IMAGE_CMD = P2_EVAL_CMD.format(dir="{dir}", run="best") + " --per-image {dir}/p2_per_image.json"
P2_CKPT_CMD = "echo CKPT > {dir}/p2_ckpt_{run}.txt  (or build_report.py --checkpoint {run}=CKPT)"
P2_ATTENTION_CMD = ("python3 p2_attention.py --images hw3_data/p3_data/images/*.jpg --out-dir {att} "
                    "--checkpoint CKPT --decoder-weights hw3_data/p2_data/decoder_model.bin")
P2_EXTREMES_CMD = ("python3 p2_attention.py --per-image {dir}/p2_per_image.json --images-root "
                   "hw3_data/p2_data/images/val --out-dir {att} --checkpoint CKPT "
                   "--decoder-weights hw3_data/p2_data/decoder_model.bin")

# Page geometry (inches) and type sizes (points).
PAGE_W, PAGE_H = 8.27, 11.69  # A4 portrait
MARGIN = 0.75
BODY, SMALL, MONO = 10.0, 8.5, 8.5
HEADING = {1: 15.0, 2: 12.5}  # problem, question
LEADING = 1.4  # line height / font size
MISSING_HEIGHT = 0.9  # the box standing in for a figure not made yet
LIST_ITEM = re.compile(r"(\d+\.|[-*]) ")  # a markdown list item's marker


# ---------------------------------------------------------------------------
# Formatting: the one place where a number becomes text
# ---------------------------------------------------------------------------


def fmt_score(value) -> str:
    """CIDEr or CLIPScore, e.g. 0.9123."""
    return NOT_MEASURED if value is None else f"{value:.4f}"


def fmt_accuracy(value) -> str:
    """A fraction as a percentage, as p1_report.py's table writes it, e.g. 61.23%."""
    return NOT_MEASURED if value is None else f"{value:.2%}"


def fmt_count(value) -> str:
    """A parameter count, e.g. 12,345,678 (12.35M)."""
    return NOT_MEASURED if value is None else f"{value:,d} ({value / 1e6:.2f}M)"


def fmt_number(value) -> str:
    """A hyper-parameter from a config: ints as ints, floats without trailing zeros."""
    return f"{value:g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def read_notes(path: str) -> dict:
    """The notes file's sections by key; fails on a heading that is not in NOTES_SECTIONS
    (a mistyped heading would silently drop its answer)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: notes file {path!r} does not exist")
    key_of = {heading.lower(): key for key, heading in NOTES_SECTIONS.items()}
    sections, key = {}, None
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("## "):
                heading = line[3:].strip()
                key = key_of.get(heading.lower())
                if key is None:
                    allowed = ", ".join(f"'## {h}'" for h in NOTES_SECTIONS.values())
                    raise SystemExit(f"error: {path}: unknown section '## {heading}'; allowed: {allowed}")
                sections[key] = []
            elif key is not None:
                sections[key].append(line.rstrip("\n"))
    return {k: "\n".join(lines).strip() for k, lines in sections.items()}


def read_json(path: str):
    """The JSON at `path`, or None when the file does not exist."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: result file {path!r} is not valid JSON: {e}") from None


def _require(condition: bool, path: str, expected: str) -> None:
    if not condition:
        raise SystemExit(f"error: result file {path!r}: expected {expected}")


def read_prompts(path: str):
    data = read_json(path)
    if data is not None:
        _require(isinstance(data, dict) and isinstance(data.get("results"), list)
                 and all(isinstance(r, dict) and "prompt" in r and "accuracy" in r for r in data["results"]),
                 path, '{"models", "n_images", "results": [{"prompt", "accuracy"}, ...]}')
    return data


def read_metrics(path: str):
    data = read_json(path)
    if data is not None:
        _require(isinstance(data, dict) and all(isinstance(data.get(k), (int, float, type(None)))
                                                for k in ("cider", "clipscore")),
                 path, '{"cider": number|null, "clipscore": number|null, ...} from p2_evaluate.py --metrics-out')
    return data


def checkpoint_paths(results: str, overrides: dict) -> dict:
    """run -> checkpoint path: --checkpoint first, else the path in p2_ckpt_<run>.txt."""
    paths = {}
    for run in RUNS:
        pointer = os.path.join(results, f"p2_ckpt_{run}.txt")
        if run in overrides:
            paths[run] = overrides[run]
        elif os.path.isfile(pointer):
            with open(pointer, encoding="utf-8") as f:
                lines = [line.strip() for line in f if line.strip()]
            _require(len(lines) == 1, pointer, "one line holding a checkpoint path")
            paths[run] = lines[0]
    return paths


def read_run(run: str, path: str) -> dict:
    """What the report shows of a checkpoint: its config, saved-tensor count and training log."""
    from captioner import read_checkpoint

    if not os.path.isfile(path):
        warn(f"checkpoint of run {run!r} not found: {path}")
        return {"path": path, "missing": True}
    try:
        checkpoint = read_checkpoint(path)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    config = checkpoint["config"]
    if run in PEFT_RUNS and config.get("peft") != run:
        raise SystemExit(f"error: the checkpoint given for the {run!r} attempt ({path}) "
                         f"was trained with --peft {config.get('peft')!r}")
    return {"path": path, "config": config, "trainable": sum(t.numel() for t in checkpoint["state_dict"].values()),
            "curve": read_curve(path + ".log.jsonl")}


def read_curve(path: str):
    """[(step, val_cider)] from p2_train.py's log, or None without a log."""
    if not os.path.isfile(path):
        return None
    points = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            try:
                record = json.loads(line) if line.strip() else {}
            except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line
                warn(f"{path}:{number}: not a JSON record, skipped")
                continue
            if "val_cider" in record:
                points.append((record["step"], record["val_cider"]))
    return points or None


def find_png(results: str, recorded, pattern: str):
    """A figure: the path a JSON recorded (absolute, relative to the current directory or
    to the results folder), else the first file matching `pattern` in the results folder."""
    if recorded:
        for candidate in (recorded, os.path.join(results, recorded), os.path.join(results, os.path.basename(recorded))):
            if os.path.isfile(candidate):
                return candidate
    matches = sorted(glob.glob(os.path.join(glob.escape(results), pattern)))
    return matches[0] if matches else None


def warn(message: str) -> None:
    print("warning: " + message, file=sys.stderr)


_TEXT_TO_PATH = TextToPath()


@functools.lru_cache(maxsize=None)
def text_width(text: str, size: float, family: str = "sans-serif", weight: str = "normal") -> float:
    """Width in inches of `text` in the font matplotlib draws it with (cached: wrapping asks per word)."""
    prop = FontProperties(family=family, weight=weight, size=size)
    return _TEXT_TO_PATH.get_text_width_height_descent(text, prop, ismath=False)[0] / 72


# ---------------------------------------------------------------------------
# Layout: blocks placed top to bottom, a new A4 page when one does not fit
# ---------------------------------------------------------------------------


class Pages:
    """A flowing A4 document on matplotlib figures, saved page by page into a PdfPages."""

    def __init__(self, pdf: PdfPages, footer: str):
        self.pdf, self.footer = pdf, footer
        self.fig, self.y, self.count = None, 0.0, 0  # y: inches from the page bottom to the next block's top

    @property
    def width(self) -> float:
        return PAGE_W - 2 * MARGIN

    def new_page(self) -> None:
        self.finish_page()
        self.fig = plt.figure(figsize=(PAGE_W, PAGE_H))
        self.count += 1
        self.y = PAGE_H - MARGIN
        self.fig.text(0.5, MARGIN / 2 / PAGE_H, f"{self.footer} | page {self.count}",
                      ha="center", va="center", fontsize=SMALL - 1, color="0.4")

    def finish_page(self) -> None:
        if self.fig is not None:
            self.pdf.savefig(self.fig)
            plt.close(self.fig)
            self.fig = None

    def need(self, height: float) -> None:
        """Start a new page unless `height` inches fit on this one."""
        if self.fig is None or self.y - height < MARGIN:
            self.new_page()

    def space(self, points: float) -> None:
        self.y -= points / 72

    def lines(self, lines, size=BODY, family="sans-serif", indent=0.0, **style) -> None:
        step = size * LEADING / 72
        for line in lines:
            self.need(step)
            self.fig.text((MARGIN + indent) / PAGE_W, self.y / PAGE_H, line, fontsize=size, family=family,
                          va="top", ha="left", **style)
            self.y -= step

    def wrap(self, text: str, size=BODY, family="sans-serif", weight="normal", indent=0.0) -> list:
        """`text` (whitespace collapsed) in lines that fit the text width less `indent`,
        measured in the font; a word wider than a line is cut."""
        room = self.width - indent
        space = text_width("a a", size, family, weight) - text_width("aa", size, family, weight)
        lines, line, used = [], "", 0.0  # used: the width of `line`, summed word by word
        for word in text.split():
            width = text_width(word, size, family, weight)
            if line and used + space + width <= room:
                line, used = f"{line} {word}", used + space + width
                continue
            if line:
                lines.append(line)
            line, used = word, width
            while used > room:  # a word wider than the line (a long path): cut it
                cut = len(line) - 1
                while cut > 1 and text_width(line[:cut], size, family, weight) > room:
                    cut -= 1
                lines.append(line[:cut])
                line = line[cut:]
                used = text_width(line, size, family, weight)
        lines.append(line)
        return lines

    def heading(self, text: str, level: int = 2) -> None:
        size = HEADING[level]
        lines = self.wrap(text, size, weight="bold")
        # never a heading alone at a page's foot
        self.need(len(lines) * size * LEADING / 72 + 4 * BODY * LEADING / 72)
        self.space(6 if level > 1 else 0)
        self.lines(lines, size=size, weight="bold")
        self.space(2)

    def paragraph(self, text: str, size=BODY, indent=0.0, **style) -> None:
        self.lines(self.wrap(text, size, indent=indent), size=size, indent=indent, **style)
        self.space(size * 0.4)

    def markdown(self, text: str) -> None:
        """Paragraphs (blank-line separated) and `- ` / `1. ` list items, wrapped; no other markup."""
        for block in text.split("\n\n"):
            items = []
            for line in block.splitlines():
                if not items or LIST_ITEM.match(line.strip()):
                    items.append(line.strip())
                else:
                    items[-1] += " " + line.strip()
            for item in items:
                marker = LIST_ITEM.match(item)
                if marker is None:
                    self.lines(self.wrap(item))
                    continue
                bullet = "\u2022" if marker.group(1) in "-*" else marker.group(1)
                indent = 0.15 + text_width(bullet + "  ", BODY)  # the item's text hangs right of its marker
                self.need(BODY * LEADING / 72)
                self.fig.text((MARGIN + 0.15) / PAGE_W, self.y / PAGE_H, bullet, fontsize=BODY, va="top")
                self.lines(self.wrap(item[marker.end():], indent=indent), indent=indent)
            self.space(BODY * 0.5)

    def notes(self, notes: dict, key: str) -> None:
        text = notes.get(key)
        if text is None:
            self.paragraph(f"(section '## {NOTES_SECTIONS[key]}' is missing from the notes file)", style="italic")
        elif not text or text == TO_BE_WRITTEN:
            self.paragraph(TO_BE_WRITTEN, style="italic", color="0.35")
        else:
            self.markdown(text)

    def table(self, header: list, rows: list, size=MONO) -> None:
        """A monospaced table; the last column wraps when the page is too narrow."""
        cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
        chars = int(self.width / text_width("0", size, "monospace"))
        fixed = sum(widths[:-1]) + 3 * (len(widths) - 1)
        widths[-1] = max(12, min(widths[-1], chars - fixed))
        out = []
        for n, row in enumerate(cells):
            last = textwrap.wrap(row[-1], widths[-1]) or [""]
            head = " | ".join(c.ljust(w) for c, w in zip(row[:-1], widths[:-1]))
            pad = " " * len(head)
            for k, piece in enumerate(last):
                out.append(((head if k == 0 else pad) + (" | " if len(row) > 1 else "") + piece).rstrip())
            if n == 0:
                out.append("-+-".join("-" * w for w in widths))
        self.need(min(len(out), 6) * size * LEADING / 72)
        self.lines(out, size=size, family="monospace")
        self.space(size * 0.6)

    def image(self, path: str, max_height: float, caption: str | None = None) -> None:
        """An image file scaled to the text width (or `max_height` inches), centred; pixels embedded as is."""
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        width, height = self.image_size(path, max_height)
        caption_lines = self.wrap(caption, SMALL) if caption else []
        self.need(height + 3 / 72 + len(caption_lines) * SMALL * LEADING / 72)  # image and caption together
        left = MARGIN + (self.width - width) / 2
        ax = self.fig.add_axes([left / PAGE_W, (self.y - height) / PAGE_H, width / PAGE_W, height / PAGE_H])
        ax.imshow(pixels, interpolation="none")
        ax.axis("off")
        self.y -= height + 3 / 72
        self.lines(caption_lines, size=SMALL, color="0.25")
        self.space(SMALL * 0.6)

    def image_size(self, path: str, max_height: float) -> tuple:
        """(width, height) in inches that `image` gives the file at `path`."""
        with Image.open(path) as image:
            w, h = image.size
        width = min(self.width, max_height * w / h)
        return width, width * h / w

    def titled_figure(self, title: str, text: str, png, max_height: float, what: str, command: str) -> None:
        """A bold title, a line of text and a figure (or the missing-figure box), kept on one page."""
        text_lines = self.wrap(text)
        figure = self.image_size(png, max_height)[1] if png else MISSING_HEIGHT
        self.need((1 + len(text_lines)) * BODY * LEADING / 72 + figure + 0.1)
        self.lines([title], weight="bold")
        self.lines(text_lines)
        self.space(3)
        if png:
            self.image(png, max_height)
        else:
            self.missing_figure(what, command)

    def missing_figure(self, what: str, command: str, height: float = MISSING_HEIGHT) -> None:
        """A dashed empty box saying which figure is not there and how to make it."""
        self.need(height)
        ax = self.fig.add_axes([MARGIN / PAGE_W, (self.y - height) / PAGE_H, self.width / PAGE_W, height / PAGE_H])
        ax.add_patch(Rectangle((0, 0), 1, 1, fill=False, linestyle="--", edgecolor="0.5", transform=ax.transAxes))
        ax.axis("off")
        text = "\n".join(self.wrap(f"{what}: {NOT_MEASURED}. Produced by: {command}", SMALL, indent=0.4))
        ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=SMALL, color="0.3", transform=ax.transAxes)
        self.y -= height + 8 / 72

    def plot(self, draw, height: float) -> None:
        """A matplotlib plot drawn by `draw(ax)` across the text width."""
        self.need(height)
        left = MARGIN + 0.6
        ax = self.fig.add_axes([left / PAGE_W, (self.y - height + 0.45) / PAGE_H,
                                (self.width - 0.8) / PAGE_W, (height - 0.6) / PAGE_H])
        draw(ax)
        self.y -= height


# ---------------------------------------------------------------------------
# Report sections
# ---------------------------------------------------------------------------


class Sources:
    """Where the inputs are, and a record of each result file looked for (the closing checklist)."""

    def __init__(self, results: str, attention_dir: str, notes: dict, runs: dict):
        self.results, self.attention_dir, self.notes, self.runs = results, attention_dir, notes, runs
        self.looked = []  # (what, path or None, command)

    def command(self, template: str, **fields) -> str:
        return template.format(dir=self.results, att=self.attention_dir, **fields)

    def read(self, name: str, template: str, reader=read_json, folder: str | None = None, **fields):
        path = os.path.join(folder or self.results, name)
        data = reader(path)
        self.looked.append((name, path if data is not None else None, self.command(template, **fields)))
        return data

    def figure(self, what: str, recorded, pattern: str, template: str, folder: str | None = None):
        png = find_png(folder or self.results, recorded, pattern)
        self.looked.append((what, png, self.command(template)))
        return png


def title_block(doc: Pages, src: Sources) -> None:
    doc.new_page()
    doc.lines(["Deep Learning for Computer Vision (NTU, Fall 2023)"], size=11, color="0.3")
    doc.lines(["Homework 3 report"], size=20, weight="bold")
    doc.lines(["Zero-shot classification with CLIP; image captioning with PEFT"], size=12)
    doc.space(6)
    doc.lines([f"Student: {student_line(src.notes)}"], size=BODY + 1)
    doc.paragraph(f"Generated {datetime.date.today().isoformat()} by build_report.py from the result files in "
                  f"'{src.results}'. A value printed as '{NOT_MEASURED}' has no result file yet; the last page "
                  "lists every file and the command that writes it.", size=SMALL, color="0.35")
    doc.space(4)


def model_label(spec: str) -> str:
    """A CLIP model as the table shows it: a name as is (ViT-L/14), a weights file by its name."""
    is_file = os.path.splitext(spec)[1] in (".pt", ".pth", ".bin", ".safetensors")
    return os.path.basename(spec) if is_file else spec


def student_line(notes: dict) -> str:
    return " ".join((notes.get("student") or "name / ID").split())


def problem1(doc: Pages, src: Sources) -> None:
    doc.heading("Problem 1: zero-shot image classification with CLIP", 1)

    doc.heading("1. Why CLIP classifies zero-shot")
    doc.notes(src.notes, "p1_zero_shot")

    doc.heading("2. Prompt-text analysis")
    report = src.read("p1_prompts.json", P1_ACCURACY_CMD, read_prompts)
    if report is None:
        from p1_report import ENSEMBLE_NAME, REPORT_PROMPTS

        doc.paragraph("Validation accuracy ({object} is the class name):")
        rows = [[p.replace("{}", "{object}"), NOT_MEASURED] for p in REPORT_PROMPTS] + [[ENSEMBLE_NAME, NOT_MEASURED]]
        doc.table(["prompt", "accuracy"], rows)
    else:
        models = [model_label(str(m)) for m in report.get("models") or []]
        doc.paragraph(f"Validation accuracy on {report.get('n_images', NOT_MEASURED)} images, CLIP "
                      f"{' + '.join(models) or '(models not recorded)'}, horizontal-flip test-time augmentation "
                      "({object} is the class name):")
        header, rows = ["prompt", "accuracy"], []
        if len(models) > 1:  # p1_report.py adds per-model accuracies to an ensemble's rows
            header += models
        for row in report["results"]:
            cells = [row["prompt"], fmt_accuracy(row["accuracy"])]
            if len(models) > 1:
                cells += [fmt_accuracy(a) for a in row.get("per_model") or [None] * len(models)]
            rows.append(cells)
        doc.table(header, rows)
    doc.notes(src.notes, "p1_prompts")

    doc.heading("3. Top-5 similarity probabilities of three validation images")
    top5 = src.read("p1_top5.json", P1_TOP5_CMD)
    shown = 0
    for name, rows in ((top5 or {}).get("images") or {}).items():
        stem = os.path.splitext(name)[0]
        png = find_png(src.results, None, f"p1_top5_{glob.escape(stem)}.png") or \
            find_png(src.results, None, f"p1_top5_{glob.escape(name)}.png")
        listing = "; ".join(f"{r['prompt']} {fmt_accuracy(r['probability'])}" for r in rows)
        if png:
            doc.image(png, 2.6, f"{name}: {listing}")
        else:
            doc.paragraph(f"{name}: {listing}")
            doc.missing_figure(f"p1_top5_{stem}.png", src.command(P1_TOP5_CMD))
        shown += 1
    if top5 is None:  # figures without their numbers file
        for png in sorted(glob.glob(os.path.join(glob.escape(src.results), "p1_top5_*.png"))):
            doc.image(png, 2.6, os.path.basename(png))
            shown += 1
    if not shown:
        doc.missing_figure("top-5 figures (p1_top5_<image>.png)", src.command(P1_TOP5_CMD))
    elif shown != 3:
        doc.paragraph(f"({shown} images here; the report asks for three.)", size=SMALL, style="italic")


def peft_description(decoder: dict) -> str:
    """The PEFT hyper-parameters a decoder config enables (any mix of the three)."""
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
    return "; ".join(parts) or "none (cross-attention and its projection only)"


def decoding_description(gen: dict) -> str:
    if not gen:
        return "not recorded"
    beam = gen.get("beam_size")
    how = "greedy" if beam == 1 else f"beam search, beam {beam}"
    return f"{how}, at most {gen.get('max_len')} tokens, length penalty {fmt_number(gen.get('length_penalty'))}"


def setting_rows(run: dict) -> list:
    """[name, value] rows describing a run's checkpoint."""
    if run.get("missing"):
        return [["checkpoint", f"{run['path']} (file not found)"]]
    config = run["config"]
    encoder, decoder = config["encoder"], config["decoder"]
    n_layer, cross = decoder.get("n_layer"), decoder.get("cross_layers")
    kwargs = encoder.get("model_kwargs") or {}
    return [
        ["checkpoint", run["path"]],
        ["image encoder (frozen)", encoder["name"] + (f" {json.dumps(kwargs)}" if kwargs else "")
         + (f", width {decoder['encoder_width']}" if "encoder_width" in decoder else "")],
        ["text decoder", f"GPT-2, {n_layer} blocks, width {decoder.get('n_embd')}"],
        ["cross-attention", f"every block (0-{n_layer - 1})" if cross is None and n_layer
         else "blocks " + ", ".join(map(str, cross or []))],
        ["PEFT", f"{config.get('peft')}: {peft_description(decoder)}"],
        ["trainable parameters", f"{fmt_count(run['trainable'])}, the checkpoint's saved tensors"],
        ["decoding", decoding_description(config.get("generation") or {})],
    ]


def problem2_metrics(doc: Pages, src: Sources) -> None:
    doc.heading("Problem 2: image captioning with parameter-efficient fine-tuning", 1)

    doc.heading("1. Best setting and its validation scores")
    m = src.read("p2_metrics_best.json", P2_PRED_CMD + "; then " + P2_EVAL_CMD, read_metrics, run="best") or {}
    doc.paragraph(f"CIDEr {fmt_score(m.get('cider'))} | CLIPScore {fmt_score(m.get('clipscore'))}"
                  + (f" on {m['n_images']} validation images" if "n_images" in m else ""), weight="bold")
    best = src.runs.get("best")
    src.looked.append(("p2_ckpt_best.txt", best and best["path"], src.command(P2_CKPT_CMD, run="best")))
    if best:
        doc.table(["setting", "value"], setting_rows(best))
    else:
        doc.paragraph(f"Setting: {NOT_MEASURED} (no checkpoint given).")
    doc.notes(src.notes, "p2_best")

    doc.heading("2. Three PEFT attempts")
    rows = []
    for name in PEFT_RUNS:
        m = src.read(f"p2_metrics_{name}.json", P2_PRED_CMD + "; then " + P2_EVAL_CMD, read_metrics, run=name) or {}
        run = src.runs.get(name) or {}
        src.looked.append((f"p2_ckpt_{name}.txt", run.get("path"), src.command(P2_CKPT_CMD, run=name)))
        if "config" in run:
            hyper, count = peft_description(run["config"]["decoder"]), fmt_count(run["trainable"])
        else:
            hyper = count = NOT_MEASURED
        rows.append([name, fmt_score(m.get("cider")), fmt_score(m.get("clipscore")), count, hyper])
    doc.table(["attempt", "CIDEr", "CLIPScore", "trainable params", "PEFT hyper-parameters"], rows)
    doc.paragraph("Validation scores by p2_evaluate.py; settings and parameter counts from each attempt's "
                  "checkpoint.", size=SMALL, color="0.3")
    for name in PEFT_RUNS:
        if "config" in (src.runs.get(name) or {}):
            doc.lines([f"{name}:"], size=SMALL, weight="bold")
            doc.table(["setting", "value"], setting_rows(src.runs[name])[1:], size=SMALL - 0.5)
    curves = {}  # label -> points; a run given twice (best is often one of the attempts) drawn once
    for path in dict.fromkeys(run["path"] for run in src.runs.values() if run.get("curve")):
        names = [name for name, run in src.runs.items() if run["path"] == path]
        curves[" = ".join(names)] = next(src.runs[n]["curve"] for n in names)
    if curves:
        def draw(ax):
            for name, points in curves.items():
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o", markersize=3, label=name)
            ax.set_xlabel("training step", fontsize=SMALL)
            ax.set_ylabel("validation CIDEr-D", fontsize=SMALL)
            ax.tick_params(labelsize=SMALL - 1)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=SMALL - 1)
        doc.plot(draw, 2.8)
        doc.paragraph("Validation CIDEr while training, from p2_train.py's <checkpoint>.log.jsonl (in-process "
                      "CIDEr-D with the validation decoding of p2_train.py, so it can differ from the table).",
                      size=SMALL, color="0.3")
    doc.notes(src.notes, "p2_peft")


def problem2_attention(doc: Pages, src: Sources) -> None:
    attention = src.read("attention.json", P2_ATTENTION_CMD, folder=src.attention_dir) or {}
    doc.heading("3. Cross-attention of each generated word (last decoder block), five test images")
    for stem in ATTENTION_IMAGES:
        entry = attention.get(stem) or {}
        png = src.figure(f"attention_{stem}.png", entry.get("png"), f"attention_{glob.escape(stem)}.png",
                         P2_ATTENTION_CMD, src.attention_dir)
        doc.titled_figure(f"{stem}.jpg", f"caption: {entry.get('caption', NOT_MEASURED)}", png, 4.2,
                          f"attention_{stem}.png", src.command(P2_ATTENTION_CMD))

    doc.heading("4. Top-1 and last-1 validation images by CLIPScore")
    per_image = None  # the ranked list is needed only where p2_attention.py has not recorded top1/last1
    if not all(attention.get(which) for which in ("top1", "last1")):
        per_image = src.read("p2_per_image.json", P2_PER_IMAGE_CMD)
    for which, index, title in (("top1", 0, "Top-1 (highest CLIPScore)"), ("last1", -1, "Last-1 (lowest CLIPScore)")):
        entry = attention.get(which) or (per_image[index] if per_image else None)
        if entry:
            text = f"image {entry['key']}: \"{entry['caption']}\" | CLIPScore {fmt_score(entry['clip_score'])}"
            pattern = f"attention_{which}_{glob.escape(entry['key'])}.png"
        else:
            text, pattern = f"CLIPScore {NOT_MEASURED}", f"attention_{which}_*.png"
        png = src.figure(f"attention_{which}_<key>.png", (entry or {}).get("png"), pattern, P2_EXTREMES_CMD,
                         src.attention_dir)
        doc.titled_figure(title, text, png, 4.2, f"attention_{which}_<key>.png", src.command(P2_EXTREMES_CMD))

    doc.heading("5. Analysis")
    doc.notes(src.notes, "p2_attention")


def checklist(doc: Pages, src: Sources) -> None:
    doc.heading("Result files", 1)
    doc.paragraph(f"What this report read from '{src.results}' (attention figures from '{src.attention_dir}'); "
                  "CKPT, PRED.json and IMG are yours to name.", size=SMALL, color="0.3")
    groups = {}  # command -> [(what, path)], in the order looked for
    for what, path, command in src.looked:
        if what not in {w for w, _ in groups.get(command, [])}:
            groups.setdefault(command, []).append((what, path))
    for command, files in groups.items():
        for what, path in files:
            shown = f"{what}  ({path})" if path and what.endswith(".txt") else what
            doc.lines([("found    " if path else "MISSING  ") + shown], size=SMALL, family="monospace",
                      weight="normal" if path else "bold")
        if not all(path for _, path in files):
            doc.lines(doc.wrap(command, SMALL - 0.5, family="monospace", indent=0.4), size=SMALL - 0.5,
                      family="monospace", indent=0.4, color="0.3")
        doc.space(3)


def build(results: str, notes_path: str, out: str, checkpoints: dict, attention_dir: str | None = None) -> int:
    """Write the report to `out` (through a temporary file); returns the page count."""
    notes = read_notes(notes_path)
    runs = {run: read_run(run, path) for run, path in checkpoint_paths(results, checkpoints).items()}
    src = Sources(results, attention_dir or results, notes, runs)
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(out) + ".", suffix=".tmp", dir=os.path.dirname(out))
    os.close(fd)
    try:
        with PdfPages(tmp, metadata={"Title": "DLCV HW3 report", "Author": student_line(notes)}) as pdf:
            doc = Pages(pdf, f"DLCV HW3 report | {student_line(notes)}")
            title_block(doc, src)
            problem1(doc, src)
            doc.new_page()
            problem2_metrics(doc, src)
            doc.new_page()
            problem2_attention(doc, src)
            doc.new_page()
            checklist(doc, src)
            doc.finish_page()
            pages = doc.count
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return pages


def parse_checkpoint(value: str):
    run, sep, path = value.partition("=")
    if not sep or run not in RUNS or not path:
        raise argparse.ArgumentTypeError(f"expected RUN=PATH with RUN one of {', '.join(RUNS)}, got {value!r}")
    return run, path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("The results folder"):])
    p.add_argument("--results", default="outputs", help="folder of the result files (default %(default)s)")
    p.add_argument("--attention-dir", help="p2_attention.py's --out-dir (default: the results folder)")
    p.add_argument("--notes", default="report_notes.md", help="free-text answers, one '## ' section per question")
    p.add_argument("--out", default="hw3_report.pdf", help="the PDF (the course names it hw3_<studentID>.pdf)")
    p.add_argument("--checkpoint", action="append", type=parse_checkpoint, default=[], metavar="RUN=PATH",
                   help=f"checkpoint of a run ({', '.join(RUNS)}); overrides DIR/p2_ckpt_<run>.txt")
    p.add_argument("--best-checkpoint", metavar="PATH", help="same as --checkpoint best=PATH")
    args = p.parse_args(argv)
    checkpoints = dict(args.checkpoint)
    if args.best_checkpoint:
        checkpoints["best"] = args.best_checkpoint
    pages = build(args.results, args.notes, args.out, checkpoints, args.attention_dir)
    print(f"wrote {args.out} ({pages} pages)")


if __name__ == "__main__":
    main()
