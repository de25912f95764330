"""The command lines a student types: help that helps, answered at once, and quiet runs.

Every script (a module with `if __name__ == "__main__"` and an argparse parser, at the
repository root and in bench/) is walked option by option: each has a help line, and each
option that takes a value and is not required shows its default (the value itself, or what
leaving it out means), so that `--help` alone says what a run will do.
"""
import argparse
import glob
import importlib
import inspect
import os
import re
import subprocess
import sys
import warnings

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))


def scripts() -> list:
    """Paths of the scripts, relative to the repository: modules with a main block that parse options."""
    found = []
    for path in sorted(glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "bench", "*.py"))):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if "__main__" in text and "argparse" in text:
            found.append(os.path.relpath(path, REPO))
    return found


SCRIPTS = scripts()
# p2_train.py's parser takes its choices and bounds (PEFT presets, LoRA targets, the default encoder, the
# decoding limits) from the model modules, which import torch: its --help does not answer before torch yet
ROOT_SCRIPTS = [s for s in SCRIPTS if os.sep not in s and s != "p2_train.py"]
HEAVY = {"torch", "timm", "clip", "transformers"}


class _Parsed(Exception):
    def __init__(self, parser):
        super().__init__()
        self.parser = parser


def parser_of(script: str, monkeypatch) -> argparse.ArgumentParser:
    """The script's parser, caught as main() hands it the command line (nothing else runs)."""
    module = importlib.import_module(os.path.splitext(os.path.basename(script))[0])

    def caught(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", caught)
    monkeypatch.setattr(sys, "argv", [script])
    with pytest.raises(_Parsed) as parsed:
        module.main([]) if inspect.signature(module.main).parameters else module.main()
    return parsed.value.parser


def walk(parser, prefix=""):
    """(where, parser, action) for every option of the parser and of its subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            lines = {choice.dest: choice.help for choice in action._choices_actions}  # add_parser(help=...)
            for name, sub in action.choices.items():
                yield f"{prefix}{name} (subcommand)", parser, argparse.Namespace(help=lines.get(name))
                yield from walk(sub, f"{prefix}{name} ")
            continue
        yield prefix + ("/".join(action.option_strings) or action.dest), parser, action


NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def shows_number(text: str, value) -> bool:
    """Whether `text` spells the number `value` (0.0001, 1e-4 and 1e-04 alike)."""
    return any(float(token) == value for token in NUMBER.findall(text))


def problems_of(parser) -> list:
    problems = []
    for where, owner, action in walk(parser):
        if not action.help or action.help == argparse.SUPPRESS:
            problems.append(f"{where}: no help line")
            continue
        if not isinstance(action, argparse.Action) or action.nargs == 0:
            continue  # a subcommand's line, or a flag (store_true, ...): no value, no default
        if action.required or (not action.option_strings and action.nargs not in ("?", "*")):
            continue  # the user must give it
        text = owner._get_formatter()._expand_help(action)
        number = isinstance(action.default, (int, float)) and not isinstance(action.default, bool)
        if number and not shows_number(text, action.default):
            problems.append(f"{where}: help does not show the default, {action.default!r}: {text!r}")
        elif not number and not re.search(r"default|required", text, re.I) and str(action.default) not in text:
            problems.append(f"{where}: help does not show the default ({action.default!r}) or what "
                            f"leaving the option out means: {text!r}")
    return problems


def test_the_walk_finds_every_script():
    expected = {"build_report.py", "selfcheck.py", "p1_report.py", "demo.py", "p2_evaluate.py", "hw3_cache.py",
                "p2_attention.py", "p2_select.py", "p1_zeroshot.py", "p2_inference.py", "p2_train.py"}
    assert expected <= set(scripts())


def test_the_walk_catches_a_missing_help_line_and_a_hidden_default():
    """The check itself: each kind of gap is found."""
    p = argparse.ArgumentParser()
    p.add_argument("--bare", type=int, default=3)
    p.add_argument("--hidden", type=int, default=3, help="how many")
    p.add_argument("--stale", type=int, default=4, help="how many (default 3)")
    p.add_argument("--computed", default="/a/b", help="a folder (default: this repository)")
    p.add_argument("--good", type=int, default=3, help="how many (default %(default)s)")
    p.add_argument("--optional", help="a file (default: none written)")
    p.add_argument("--flag", action="store_true", help="turn it on")
    sub = p.add_subparsers(dest="command").add_parser("run")
    sub.add_argument("--x", type=float, default=0.5)
    problems = problems_of(p)
    assert [s.split(":")[0] for s in problems] == ["--bare", "--hidden", "--stale", "run (subcommand)", "run --x"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_option_has_a_help_line_that_shows_its_default(script, monkeypatch):
    assert problems_of(parser_of(script, monkeypatch)) == []


# What a hostile tester types for a number (issue 24): each is refused when parsed, in one line, or is in range.
HOSTILE_NUMBERS = ["nan", "inf", "-inf", "-1", "0", "1e30", "", "abc", "1" * 400, "2.5"]


@pytest.mark.parametrize("script", [s for s in SCRIPTS if os.sep not in s])
def test_every_numeric_option_is_checked_against_its_range_when_parsed(script, monkeypatch):
    """A bare `type=int` / `type=float` takes nan, -1 or 0 and fails later (a traceback from
    numpy's seed, Pillow's empty image, the DataLoader) or runs nonsense: every number is an
    io_utils.Range, whose text the help line shows."""
    from io_utils import Range

    parser = parser_of(script, monkeypatch)
    for where, owner, action in walk(parser):
        if not isinstance(action, argparse.Action):
            continue
        assert action.type not in (int, float), f"{script} {where}: type={action.type.__name__}, not a Range"
        if not isinstance(action.type, Range):
            continue
        help_text = " ".join(owner._get_formatter()._expand_help(action).split())
        assert str(action.type) in help_text, (script, where, help_text)
        for text in HOSTILE_NUMBERS:
            try:
                value = action.type(text)
            except argparse.ArgumentTypeError:
                continue
            assert action.type.holds(value), (script, where, text, value)


def test_a_huge_integer_is_refused_in_one_line_not_a_traceback():
    """int('1' * 400) is a valid Python int that float() cannot hold."""
    for script, option in [("p2_train.py", "--batch-size"), ("demo.py", "--seed")]:
        done = subprocess.run([sys.executable, script, *(["x"] if script == "demo.py" else []), option, "1" * 400],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith(f"{script}: error: ")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_the_environment_variables_the_script_reads_with_their_defaults(script, monkeypatch):
    with open(os.path.join(REPO, script), encoding="utf-8") as f:  # read, not set for a child process
        names = sorted(set(re.findall(r"(?:environ\.get|getenv|env_number)\(\s*[\"'](HW3_\w+)", f.read())))
    text = parser_of(script, monkeypatch).format_help()
    for name in names:
        assert name in text, f"{script} reads ${name} but --help does not say so"
        after = text[text.index(name) + len(name):]
        entry = re.split(r"\n\s*HW3_", after, maxsplit=1)[0]
        assert "default" in entry, f"{script} --help: ${name} without its default: {entry!r}"


@pytest.mark.parametrize("script", ROOT_SCRIPTS)
def test_help_answers_before_the_heavy_modules_load(script):
    """`--help` parses before torch, timm or CLIP load (p1_zeroshot.py took 3-5 s to answer before)."""
    code = ("import runpy, sys\n"
            f"sys.argv = [{script!r}, '--help']\n"
            "try:\n"
            f"    runpy.run_path({script!r}, run_name='__main__')\n"
            "except SystemExit as stop:\n"
            "    assert stop.code in (0, None), stop.code\n"
            "print(' '.join(sorted(sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = set(result.stdout.splitlines()[-1].split()) & HEAVY  # the last line: after the help text
    assert not loaded, f"{script} --help imports {sorted(loaded)}"


def test_known_third_party_warnings_are_hidden_and_ours_are_not():
    import io_utils

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        io_utils.quiet_known_warnings()
        noise = [(FutureWarning, "`torch.jit.script` is deprecated. Please switch to torch.compile", "torch.jit._script"),
                 (FutureWarning, "`torch.jit.load` is deprecated.", "torch.jit._serialization"),
                 (UserWarning, "pkg_resources is deprecated as an API.", "clip.clip")]
        for category, message, module in noise:
            warnings.warn_explicit(message, category, "x.py", 1, module=module)
        assert caught == []
        kept = [(FutureWarning, "`torch.jit.script` is deprecated.", "captioner"),  # another module
                (DeprecationWarning, "`torch.jit.load` is deprecated.", "torch.jit._serialization"),  # another kind
                (FutureWarning, "torch.jit: something else", "torch.jit._script"),  # another message
                (UserWarning, "pkg_resources is deprecated as an API.", "p2_evaluate")]
        for category, message, module in kept:
            warnings.warn_explicit(message, category, "x.py", 1, module=module)
        assert [str(w.message) for w in caught] == [message for _, message, _ in kept]


@pytest.fixture(scope="module")
def untrained(tmp_path_factory, tiny_gpt2, tiny_vit_file):
    """A checkpoint of the tiny untrained captioner, two images and an annotation file for them."""
    import json

    import captioner
    import synthetic
    from conftest import TINY_VIT, TINY_VIT_KWARGS

    root = tmp_path_factory.mktemp("quiet")
    config = captioner.make_config("none", encoder=TINY_VIT, encoder_kwargs=TINY_VIT_KWARGS,
                                   generation=dict(beam_size=1, max_len=4))
    model = captioner.Captioner(config, tiny_gpt2[0], tiny_vit_file)
    captioner.mark_trainable(model, verbose=False)
    captioner.save_checkpoint(model, str(root / "untrained.pt"))
    images = root / "images"
    paths = synthetic.make_report_images(str(images), size=32)[:2]
    keys = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    annotation = {"images": [{"file_name": k + ".jpg", "id": i} for i, k in enumerate(keys)],
                  "annotations": [{"caption": "a shape", "image_id": i, "id": i} for i in range(len(keys))]}
    (root / "ann.json").write_text(json.dumps(annotation))
    (root / "id2label.json").write_text(json.dumps({"0": "circle", "1": "maple_tree"}))
    return dict(root=root, checkpoint=str(root / "untrained.pt"), images=str(images), keys=keys,
                decoder=tiny_gpt2[0], vit=tiny_vit_file)


def run_quietly(*args, env):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES="", **env), timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    noise = [line for line in result.stderr.splitlines() if re.search(r"\w+Warning: ", line)]
    assert noise == [], f"{args[0]} printed Python warnings when all is well"
    return result


def test_runs_are_quiet_when_all_is_well_and_keep_our_warnings(untrained, tiny_clip_file):
    """timm (torch.jit.script), CLIP (pkg_resources, torch.jit.load): no third-party noise on stderr;
    our own warnings still show."""
    import json

    root = untrained["root"]
    run_quietly("p1_zeroshot.py", untrained["images"], root / "id2label.json", root / "p1.csv",
                env={"HW3_P1_CLIP": tiny_clip_file})
    run_quietly("p2_inference.py", untrained["images"], root / "pred.json", untrained["decoder"],
                env={"HW3_P2_CKPT": untrained["checkpoint"], "HW3_P2_ENCODER_WEIGHTS": untrained["vit"]})
    long = {key: "a shape " * 60 for key in untrained["keys"]}  # over CLIP's 77 tokens: our warning
    (root / "long.json").write_text(json.dumps(long))
    result = run_quietly("p2_evaluate.py", "--pred_file", root / "long.json", "--images_root", untrained["images"],
                         "--annotation_file", root / "ann.json", "--clip-model", tiny_clip_file, "--no-cider",
                         env={})
    assert "warning: 2 caption(s) longer than CLIP's 77-token context were truncated" in result.stderr
