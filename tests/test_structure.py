"""The repository's shape: dependencies flow data -> model -> entry points, and the
static tools stay light.

Parsed with `ast`, so a lazy import inside a function counts as much as one at
the top: an entry point that imports another runs (or half-runs) a second
program, and a helper that imports an entry point makes the layers circular.
"""
import glob
import os
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


def _modules_loaded_by(statement: str) -> set:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_static_tools_import_no_torch():
    """selfcheck's static checks and script_rules start without torch or the model stack."""
    loaded = _modules_loaded_by("import selfcheck, script_rules, io_utils")
    assert not loaded & {"torch", "timm", "captioner", "decoder", "encoder", "p2_inference", "transformers"}


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
