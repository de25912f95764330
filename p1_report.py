"""Numbers and figures for the Problem 1 report (not run by the graders).

    python3 p1_report.py accuracy --val-dir DIR --id2label JSON --out-dir OUT [--clip SPEC ...]
    python3 p1_report.py top5 --id2label JSON --out-dir OUT [--clip SPEC ...] IMG [IMG ...]
    python3 p1_report.py top5 --id2label JSON --out-dir OUT [--clip SPEC ...] --pick-from DIR

`accuracy` scores the report's three prompts, each alone, and our 18-template
ensemble on validation images named `{label}_{id}.png`; every image is
encoded once per model and shared by all prompt sets. It writes
OUT/p1_prompts.md and OUT/p1_prompts.json.
`top5` draws, per image, the five most probable classes of our default
classifier beside the image: OUT/p1_top5_<stem>.png, numbers in OUT/p1_top5.json.
With --pick-from DIR it draws three images of DIR of three different classes
(`pick_images`: classes spread evenly over the label ids found in the names,
the first image of each by name), the same three on every run.

Models: --clip (repeatable, or comma-separated), else $HW3_P1_CLIP, else the
graders' default; everything else is p1_zeroshot's code path.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import clip_weights
import file_io
import image_io
import io_utils
import p1_zeroshot as zs

# The report's prompts, in the slides' wording; `{}` is the class name.
REPORT_PROMPTS = [
    "This is a photo of {}",
    "This is not a photo of {}",
    "No {}, no score.",
]
ENSEMBLE_NAME = "18 CIFAR templates (ensemble)"
# The label text the report's top-5 figure shows for a class.
TOP5_PROMPT = "a photo of a {}"


def label_from_name(name: str) -> int | None:
    """`12_456.png` -> 12; None when the name does not start with `<int>_`."""
    head, sep, _ = name.partition("_")
    return int(head) if sep and head.isdigit() and head.isascii() else None


class Classifier:
    """The CLIP models of p1_zeroshot's ensemble, loaded once."""

    def __init__(self, specs, id2label, device):
        self.specs = specs
        self.device = device
        self.class_ids = list(id2label)
        self.classnames = [id2label[i] for i in self.class_ids]
        self.models = [zs.load_clip(spec, device) for spec in specs]
        self.scales = [zs.logit_scale(model) for model, _ in self.models]

    def encode_images(self, paths, batch_size):
        return zs.image_embeddings(self.models, paths, self.device, batch_size)

    def probs(self, image_embs, templates):
        """([N, K] ensemble probabilities, [[N, K] per model]); each model's class
        embeddings for `templates` are computed once and serve both."""
        text = [zs.text_embeddings(model, self.classnames, templates, self.device) for model, _ in self.models]
        per_model = [zs.ensemble_probs([img], [txt], [scale])
                     for img, txt, scale in zip(image_embs, text, self.scales)]
        return zs.ensemble_probs(image_embs, text, self.scales), per_model


def pick_images(folder: str, n: int = 3) -> list:
    """Paths of n images of `folder` named `{label}_{id}.ext`, each of another class: the labels found,
    in numeric order, taken at even steps (the first, about a third in, about two thirds in for n = 3),
    and of each the first file by name. InputError when fewer than n classes are named."""
    by_label = {}
    for name in image_io.list_files(folder):  # sorted by name
        label = label_from_name(name)
        if label is not None:
            by_label.setdefault(label, name)
    labels = sorted(by_label)
    if len(labels) < n:
        raise io_utils.InputError(f"--pick-from {folder!r}: {len(labels)} class(es) among the file names "
                                  f"({{label}}_{{id}}.png), {n} needed; name the images instead")
    return [os.path.join(folder, by_label[labels[i * len(labels) // n]]) for i in range(n)]


def _specs(values):
    return zs.model_specs(",".join(values) if values else None)


def accuracy(args) -> dict:
    import torch

    id2label = zs.read_id2label(args.id2label)
    names = image_io.list_files(args.val_dir)
    labels = {name: label_from_name(name) for name in names}
    misnamed = [n for n, label in labels.items() if label is None or label not in id2label]
    if misnamed:
        raise SystemExit(
            f"error: {len(misnamed)} files in {args.val_dir!r} are not named "
            f"'{{label}}_{{id}}.ext' with a label among the {len(id2label)} ids of "
            f"{args.id2label!r}: {misnamed[:5]}")
    specs = _specs(args.clip)

    classifier = Classifier(specs, id2label, io_utils.pick_device())
    kept, image_embs = classifier.encode_images([os.path.join(args.val_dir, n) for n in names], zs.batch_size())
    if not kept:
        raise SystemExit(f"error: no readable image in {args.val_dir!r}")
    truth = torch.tensor([labels[os.path.basename(p)] for p in kept])  # [N]
    ids = torch.tensor(classifier.class_ids)  # [K]

    def score(probs):  # [N, K] -> fraction of correct argmax
        return int((ids[probs.argmax(dim=1)] == truth).sum()) / len(truth)

    prompt_sets = [(p.replace("{}", "{object}"), [p]) for p in REPORT_PROMPTS]
    prompt_sets.append((ENSEMBLE_NAME, zs.TEMPLATES))
    results = []
    for title, templates in prompt_sets:
        ensemble, per_model = classifier.probs(image_embs, templates)
        row = {"prompt": title, "accuracy": score(ensemble)}
        if len(specs) > 1:
            row["per_model"] = [score(p) for p in per_model]  # in the order of "models"
        results.append(row)

    report = {"models": specs, "n_images": len(kept), "results": results}
    file_io.atomic_write_text(os.path.join(args.out_dir, "p1_prompts.json"), json.dumps(report, indent=2) + "\n")
    file_io.atomic_write_text(os.path.join(args.out_dir, "p1_prompts.md"), _markdown(report))
    print(_markdown(report))
    return report


def _markdown(report) -> str:
    per_model = len(report["models"]) > 1
    header = ["prompt", "accuracy"] + (report["models"] if per_model else [])
    lines = [
        (f"Zero-shot accuracy on {report['n_images']} validation images, "
         f"CLIP {' + '.join(report['models'])}, horizontal-flip TTA."),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for row in report["results"]:
        cells = [row["prompt"].replace("|", "\\|"), f"{row['accuracy']:.2%}"]
        if per_model:
            cells += [f"{a:.2%}" for a in row["per_model"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def top5(args) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    id2label = zs.read_id2label(args.id2label)
    specs = _specs(args.clip)
    if args.pick_from:
        args.images = pick_images(args.pick_from)
        print("top-5 images: " + " ".join(args.images), file=sys.stderr)
    for path in args.images:
        if not os.path.isfile(path):
            raise SystemExit(f"error: image {path!r} does not exist")
    classifier = Classifier(specs, id2label, io_utils.pick_device())
    kept, image_embs = classifier.encode_images(args.images, zs.batch_size())
    if not kept:
        raise SystemExit("error: none of the given files is a readable image")
    probs, _ = classifier.probs(image_embs, zs.TEMPLATES)  # [N, K]
    k = min(5, probs.shape[1])
    top_p, top_k = probs.topk(k, dim=1)  # [N, k] each

    stems = [io_utils.strip_extension(os.path.basename(p)) for p in kept]
    if len(set(stems)) < len(stems):  # a.png and a.jpg: keep the extension to tell them apart
        stems = [os.path.basename(p) for p in kept]
    numbers = {}
    for path, stem, p_row, k_row in zip(kept, stems, top_p.tolist(), top_k.tolist()):
        name = os.path.basename(path)
        rows = [{"class_id": classifier.class_ids[j],
                 "class": classifier.classnames[j],
                 "prompt": TOP5_PROMPT.format(zs.clean_classname(classifier.classnames[j])),
                 "probability": p} for p, j in zip(p_row, k_row)]
        numbers[name] = rows
        truth = label_from_name(name)

        figure, (ax_image, ax_bars) = plt.subplots(
            1, 2, figsize=(9, 3), gridspec_kw={"width_ratios": [1, 2.2]}, constrained_layout=True)
        ax_image.imshow(image_io.open_rgb(path))
        ax_image.set_title(name, fontsize=9)
        ax_image.axis("off")
        ranks = list(range(k))[::-1]  # most probable on top
        colors = ["tab:green" if r["class_id"] == truth else "tab:blue" for r in rows]
        ax_bars.barh(ranks, [r["probability"] for r in rows], color=colors)
        ax_bars.set_yticks(ranks)
        ax_bars.set_yticklabels([r["prompt"] for r in rows])
        ax_bars.set_xlim(0, 1)
        ax_bars.set_xlabel("probability" if truth is None else "probability (green: true class)")
        for rank, r in zip(ranks, rows):
            ax_bars.text(min(r["probability"] + 0.01, 0.9), rank, f"{r['probability']:.1%}", va="center", fontsize=8)
        models = " + ".join(os.path.basename(s) for s in specs)
        ax_bars.set_title(f"top-{k}: CLIP {models}, {len(zs.TEMPLATES)} templates, flip TTA", fontsize=9)
        with file_io.atomic_output(os.path.join(args.out_dir, f"p1_top5_{stem}.png")) as tmp:
            figure.savefig(tmp, format="png", dpi=150, bbox_inches="tight")
        plt.close(figure)

    report = {"models": specs, "templates": len(zs.TEMPLATES), "images": numbers}
    file_io.atomic_write_text(os.path.join(args.out_dir, "p1_top5.json"), json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def check_outputs_spare_inputs(args) -> None:
    """InputError, before CLIP loads, when a file this run writes into --out-dir is one of its inputs."""
    names = ["p1_prompts.json", "p1_prompts.md"] if args.command == "accuracy" else ["p1_top5.json"]
    if args.command == "top5":
        stems = [io_utils.strip_extension(os.path.basename(p)) for p in args.images]
        if len(set(stems)) < len(stems):
            stems = [os.path.basename(p) for p in args.images]
        names += [f"p1_top5_{stem}.png" for stem in stems]
    specs = _specs(args.clip)
    inputs = {"--id2label": args.id2label, "--val-dir": getattr(args, "val_dir", None),
              "--pick-from": getattr(args, "pick_from", None),
              **{f"IMG {path!r}": path for path in getattr(args, "images", None) or []},
              **{f"--clip {spec}": spec if os.path.isfile(spec) else clip_weights.cached_path(spec) for spec in specs}}
    file_io.check_outputs_spare_inputs({f"--out-dir {name}": os.path.join(args.out_dir, name) for name in names},
                                       inputs, reads_member=image_io.is_image)


@io_utils.reports_input_errors
def main(argv=None):
    io_utils.quiet_known_warnings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{accuracy,top5}")
    subcommands = {"accuracy": "accuracy of the report's three prompts and the 18-template ensemble "
                               "(OUT/p1_prompts.md, .json)",
                   "top5": "top-5 class probabilities of a few images, as bar charts (OUT/p1_top5_<stem>.png, "
                           "OUT/p1_top5.json)"}
    for name, line in subcommands.items():
        sub = commands.add_parser(name, help=line, description=line)
        sub.add_argument("--id2label", required=True, help="the id2label JSON")
        sub.add_argument("--out-dir", required=True, help="folder for the outputs (created)")
        sub.add_argument("--clip", action="append", metavar="SPEC",
                         help="CLIP model name or checkpoint file, repeatable for an ensemble (default: "
                              f"$HW3_P1_CLIP, else {zs.DEFAULT_MODELS}, as hw3_1.sh)")
        if name == "accuracy":
            sub.add_argument("--val-dir", required=True, help="images named {label}_{id}.png")
        else:
            sub.add_argument("images", nargs="*", metavar="IMG", help="images to chart (default: none; "
                             "give them or --pick-from)")
            sub.add_argument("--pick-from", metavar="DIR", help="chart three images of DIR of three different "
                             "classes, named {label}_{id}.png (the same three every run; default: the IMGs)")
    args = parser.parse_args(argv)
    if args.command == "top5" and bool(args.images) == bool(args.pick_from):
        parser.error("top5: give the images (IMG ...) or --pick-from DIR, not both")
    try:  # before CLIP loads: the outputs are written last
        file_io.check_output_path(os.path.join(args.out_dir, "p1_top5.json"))
    except io_utils.InputError as error:
        raise io_utils.InputError(f"--out-dir: {error}") from None
    check_outputs_spare_inputs(args)
    return accuracy(args) if args.command == "accuracy" else top5(args)


if __name__ == "__main__":
    main()
