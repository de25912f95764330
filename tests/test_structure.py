"""The repository's shape: dependencies flow data -> model -> entry points, and the
static tools stay light.

Parsed with `ast`, so a lazy import inside a function counts as much as one at
the top: an entry point that imports another runs (or half-runs) a second
program, and a helper that imports an entry point makes the layers circular.
"""
import glob
import os
import re
import subprocess
import sys

from script_rules import imported_names as imported_modules

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

P2_ENTRY_POINTS = {"p2_train", "p2_inference", "p2_evaluate", "p2_attention"}
# Programs a person or a grader's script runs; nothing below them may import them.
ENTRY_POINTS = P2_ENTRY_POINTS | {"p1_zeroshot", "p1_report", "selfcheck", "build_report"}
# The exceptions: hw3_cache fetches the CLIP models that p1_zeroshot names
# (and loads them its way); p1_report reuses p1_zeroshot's classifier.
ALLOWED = {("hw3_cache", "p1_zeroshot"), ("p1_report", "p1_zeroshot")}


def repository_modules() -> dict:
    """name -> path of every Python module at the repository root."""
    return {os.path.splitext(os.path.basename(p))[0]: p for p in glob.glob(os.path.join(REPO, "*.py"))}


def repository_imports() -> dict:
    """module -> the repository modules it imports."""
    modules = repository_modules()
    graph = {}
    for name, path in modules.items():
        with open(path, encoding="utf-8") as f:
            graph[name] = imported_modules(f.read()) & set(modules)
    return graph


def test_imported_modules_sees_lazy_and_absolute_from_imports():
    source = "import a.b\nfrom c import d\n\ndef f():\n    import e\n    from .g import h\n"
    assert imported_modules(source) == {"a", "c", "e"}


def test_the_layers_are_where_the_rule_expects_them():
    modules = set(repository_modules())
    assert ENTRY_POINTS <= modules
    helpers = modules - ENTRY_POINTS
    assert {"io_utils", "hw3_cache", "synthetic", "p2_data", "captioner", "decoder", "encoder",
            "tokenizer", "cider", "clipscore"} <= helpers


def test_no_p2_entry_point_imports_another():
    graph = repository_imports()
    crossing = sorted((name, other) for name in P2_ENTRY_POINTS for other in graph[name] & P2_ENTRY_POINTS)
    assert crossing == [], "Problem 2 entry points importing each other; move the shared code into a helper"


def test_no_helper_imports_an_entry_point():
    graph = repository_imports()
    upward = sorted((name, other) for name, imports in graph.items() if name not in ENTRY_POINTS
                    for other in imports & ENTRY_POINTS if (name, other) not in ALLOWED)
    assert upward == [], "helper modules importing an entry point (data -> model -> entry points)"


def test_io_utils_is_the_bottom_layer():
    assert repository_imports()["io_utils"] == set()


def test_images_files_and_weights_stand_on_io_utils_alone():
    """The three jobs split out of io_utils (issue 22) import only the bottom layer, so any
    module may use them without a cycle."""
    graph = repository_imports()
    assert {name: graph[name] - {"io_utils"} for name in ("image_io", "file_io", "weights")} == \
        {"image_io": set(), "file_io": set(), "weights": set()}


def test_io_utils_holds_one_job():
    """Image reading, atomic outputs and torch loading live in their own modules, not in io_utils."""
    moved = {"open_rgb", "list_files", "readable_batches", "atomic_output", "read_json", "torch_load"}
    assert moved & _top_level_definitions(repository_modules()["io_utils"]) == set()


def _modules_loaded_by(statement: str) -> set:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_helpers_raise_exceptions_rather_than_exit_or_assert():
    """A library raises (InputError, ValueError...); only an entry point turns that into an exit.
    A bare `assert` is no check: `python -O` removes it. A helper's own command line (its `main`,
    its `if __name__ == "__main__"`) may exit, and so does io_utils.reports_input_errors, the
    entry points' decorator."""
    import ast

    found = []
    for name, path in repository_modules().items():
        if name in ENTRY_POINTS:
            continue
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        allowed = {id(node) for top in tree.body for node in ast.walk(top)
                   if isinstance(top, ast.FunctionDef) and top.name in ("main", "reports_input_errors")
                   or isinstance(top, ast.If) and "__name__" in ast.dump(top.test)}
        for node in ast.walk(tree):
            exits = (isinstance(node, ast.Raise) and node.exc is not None and "SystemExit" in ast.dump(node.exc)
                     or isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                     and node.func.attr == "exit" and isinstance(node.func.value, ast.Name)
                     and node.func.value.id == "sys")
            if (exits or isinstance(node, ast.Assert)) and id(node) not in allowed:
                found.append(f"{name}:{node.lineno}")
    assert found == []

def test_static_tools_import_no_torch():
    """selfcheck's static checks and script_rules start without torch or the model stack."""
    loaded = _modules_loaded_by("import selfcheck, script_rules, io_utils")
    assert not loaded & {"torch", "timm", "captioner", "decoder", "encoder", "p2_inference", "transformers"}


def test_synthetic_data_and_its_language_model_load_no_timm(tmp_path):
    """synthetic.py is test and benchmark tooling: writing the set and teaching the tiny GPT-2
    its captions (which reuses p2_data.make_batch) must not drag in the vision stack."""
    code = ("import sys, synthetic; synthetic.make_dataset(sys.argv[1], n_train=2, n_val=1, image_size=16); "
            "synthetic.pretrain_caption_lm([[64, 582], [64]], steps=1); "
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('timm', 'encoder', 'clip'))))")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "set")], cwd=REPO, capture_output=True,
                            text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert "timm" not in result.stdout.split() and "clip" not in result.stdout.split(), result.stdout


def _top_level_definitions(path: str) -> set:
    """Names a module defines at its top level (functions, classes, assignments)."""
    import ast

    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def _calls(path: str) -> set:
    """Dotted names of what a module calls: `tempfile.mkstemp`, `os.environ.get`..."""
    import ast

    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    calls = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts, func = [], node.func
            while isinstance(func, ast.Attribute):
                parts.append(func.attr)
                func = func.value
            if isinstance(func, ast.Name):
                calls.add(".".join([func.id, *reversed(parts)]))
    return calls


# Each concept and its one home (issue 10).
HOMES = {"REPO_ROOT": "io_utils", "warn": "io_utils", "pick_device": "io_utils", "loader_workers": "io_utils",
         "p2_checkpoint": "io_utils", "atomic_output": "file_io", "open_rgb": "image_io",
         "torch_load": "weights", "fit_clip_context": "clip_context",
         "EOT": "tokenizer", "EOT_ID": "tokenizer"}


def test_each_shared_concept_has_one_home():
    modules = repository_modules()
    copies = sorted((name, concept) for name, path in modules.items() for concept in _top_level_definitions(path)
                    if concept in HOMES and HOMES[concept] != name)
    assert copies == [], "define these once, in their home module, and import them"


def test_the_end_token_is_spelled_only_in_the_tokenizer():
    """<|endoftext|> and its id 50256 are tokenizer.EOT and tokenizer.EOT_ID; no other module retypes them
    (docstrings aside)."""
    import ast

    retyped = []
    for name, path in repository_modules().items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                      and isinstance(node.body[0], ast.Expr)}
        retyped += [f"{name}:{node.lineno}" for node in ast.walk(tree)
                    if isinstance(node, ast.Constant) and id(node) not in docstrings and name != "tokenizer"
                    and (node.value == 50256 and type(node.value) is int
                         or isinstance(node.value, str) and "<|endoftext|>" in node.value)]
    assert retyped == []

def test_temporary_files_and_the_checkpoint_path_have_one_home():
    """Writing a temporary and renaming it is file_io.atomic_output; reading $HW3_P2_CKPT is
    io_utils.p2_checkpoint (hw3_cache.py's os.replace installs a checked download, writing nothing)."""
    modules = repository_modules()
    temporaries = sorted((name, call) for name, path in modules.items() if name != "file_io"
                         for call in _calls(path) if call in ("tempfile.mkstemp", "tempfile.NamedTemporaryFile"))
    assert temporaries == []
    checkpoint_env = []
    for name, path in modules.items():
        with open(path, encoding="utf-8") as f:
            if name != "io_utils" and re.search(r"environ(\.get\(|\[)\s*[\"']HW3_P2_CKPT", f.read()):
                checkpoint_env.append(name)
    assert checkpoint_env == []


# Requirements that no module imports, and why they are required all the same.
INDIRECT_REQUIREMENTS = {
    "torchvision": "timm's transforms (the graders pin it)",
    "huggingface_hub": "timm's hub downloads (hw3_cache.py encoder)",
    "setuptools": "pkg_resources, which `import clip` needs",
    "gdown": "hw3_download.sh runs it",
}
IMPORT_NAMES = {"clip-anytorch": "clip", "Pillow": "PIL", "fpdf2": "fpdf"}


def test_every_requirement_is_used():
    with open(os.path.join(REPO, "requirements.txt"), encoding="utf-8") as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    names = [name for name in (line.split(";")[0].split("[")[0].split("<")[0].split(">")[0]
                                      .split("=")[0].strip() for line in lines if line) if name]
    imported = set()
    for path in repository_modules().values():
        with open(path, encoding="utf-8") as f:
            imported |= imported_modules(f.read())
    unused = [n for n in names if IMPORT_NAMES.get(n, n) not in imported and n not in INDIRECT_REQUIREMENTS]
    assert unused == [], "requirements.txt lists packages no module imports"


def test_nothing_reaches_outside_the_clone():
    """A clone with nothing beside it must pass the README's commands: no tracked file points at
    a folder beside the clone (the vocabulary is committed at the root)."""
    outside = re.compile(r"\.\./" + "shared")  # spelled in two parts so this file does not match itself
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for name in tracked:
        if name.endswith((".json", ".bpe", ".pdf")) or name == "bench/RESULTS.md":
            continue
        with open(os.path.join(REPO, name), encoding="utf-8", errors="replace") as f:
            if outside.search(f.read()):
                hits.append(name)
    assert hits == []


# Markdown files the repository's text may name without holding them, and why.
NAMED_ELSEWHERE = {
    "p1_prompts.md": "an output: p1_report.py accuracy writes it",
    "data/prompts.md": "openai/CLIP's list of prompt templates, cited as that repository's",
    "notes.md": "a test's temporary notes file",
}


def test_comments_and_messages_cite_files_that_exist():
    """A comment, docstring, message or document that names a .md file names one in the clone
    (or an output, or another repository's file, said as such); a fact from a file outside the
    repository is stated, not cited."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    missing = []
    for name in tracked:
        if name.endswith((".json", ".bpe", ".pdf")) or not os.path.isfile(os.path.join(REPO, name)):
            continue
        with open(os.path.join(REPO, name), encoding="utf-8", errors="replace") as f:
            text = f.read()
        for cited in set(re.findall(r"[\w./<>-]*[\w>]\.md\b", text)):
            base = re.sub(r"^(OUT|OUT_DIR|DIR|\.\.)?/", "", cited)
            if base in NAMED_ELSEWHERE or os.path.basename(base) in NAMED_ELSEWHERE:
                continue
            if not any(os.path.isfile(os.path.join(root, base)) for root in (REPO, os.path.dirname(os.path.join(REPO, name)))):
                missing.append(f"{name}: {cited}")
    assert missing == [], "cites files the repository does not have; state the fact instead"
