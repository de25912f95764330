"""Checks of what the graders run: their script rules and their Python stack.

A violation of the course's script rules can cost every point, and the
graders run Python 3.8 + torch 1.12.1 + timm 0.9.10. Checked here, on any
Python (and again under `make test-graders`, which runs the tests on that
stack itself):

1. every `hw3_*.sh` obeys the rules: bash only, Python run as `python3`,
   none of rm, sudo, cp, mv, mkdir, cd, pip or CUDA_VISIBLE_DEVICES,
   no absolute paths, every URL inside quotes;
2. every Python module the scripts reach (their `python3 X.py` targets and,
   transitively, the repository modules those import) passes
   `vermin --target=3.8-` and `ruff --target-version py38`, and uses no
   torch API newer than 1.12 unless the line says it is guarded;
3. every name those modules take from the graders' pinned libraries (torch,
   torchvision, timm, clip: `torch.cuda.graph`, `F.layer_norm`,
   `timm.models.model_entrypoint`...) exists in the installed release, and
   every keyword they pass it is one its signature takes (`nn.LayerNorm(C,
   bias=False)` fails on torch 1.12: `bias` came in 2.1), unless the line
   says it is guarded. A function written in C is checked against the
   signatures its docstring gives. Under `make test-graders` the installed
   releases are the graders' own (torch 1.12.1, timm 0.9.10).

    python3 script_rules.py            # check this repository, exit 1 on a violation
"""
from __future__ import annotations

import argparse
import ast
import glob
import importlib
import inspect
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings

from io_utils import REPO_ROOT

BANNED_COMMANDS = ("rm", "sudo", "cp", "mv", "mkdir", "cd", "pip", "pip3", "pip2")
# Words that may start a command; `python` and `python2` are banned too (python3 only).
PYTHON_WORDS = ("python", "python2", "python3")
COMMAND_SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", "{", "}", "then", "do", "else", "!", "$("}

# torch APIs that torch 1.12.1 lacks; a line using one must carry the word
# "guarded" (in a comment) to show it only runs where the API exists.
NEW_TORCH_APIS = (
    "scaled_dot_product_attention",
    "torch.compile",
    "weights_only",
    "torch.amp.GradScaler",
    "torch.get_default_device",
    "torch.set_default_device",
    "nn.Buffer",
    "torch.nn.attention",
    "mmap=",
    "mem_get_info",
)


def strip_comment(line: str) -> str:
    """The line without its trailing `# comment` (a `#` inside quotes stays)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def unquoted_urls(line: str) -> list[str]:
    """URLs (`scheme://...`) in a shell line that stand outside quotes."""
    found, quote, i = [], None, 0
    while i < len(line):
        ch = line[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif line.startswith("://", i):
            start = i
            while start > 0 and (line[start - 1].isalnum() or line[start - 1] in "+.-"):
                start -= 1
            end = i
            while end < len(line) and not line[end].isspace() and line[end] not in "'\";|":
                end += 1
            found.append(line[start:end])
            i = end
            continue
        i += 1
    return found


def check_script(path: str) -> list[str]:
    """Violations of the course's script rules in one bash script."""
    name = os.path.basename(path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    problems = []
    if lines and lines[0].startswith("#!") and "bash" not in lines[0]:
        problems.append(f"{name}:1: shebang {lines[0]!r} is not bash (graders run `bash {name}`)")
    for number, raw in enumerate(lines, 1):
        line = strip_comment(raw).strip()
        if not line:
            continue
        where = f"{name}:{number}"
        for url in unquoted_urls(line):
            problems.append(f"{where}: URL {url!r} must be quoted (an unquoted & breaks it)")
        if "CUDA_VISIBLE_DEVICES" in line:
            problems.append(f"{where}: CUDA_VISIBLE_DEVICES is not allowed")
        try:
            lexer = shlex.shlex(line, posix=False, punctuation_chars=";&|()")
            lexer.whitespace_split = True
            tokens = list(lexer)
        except ValueError as error:
            problems.append(f"{where}: cannot parse ({error}): {line!r}")
            continue
        command_position = True
        for token in tokens:
            bare = token.strip("\"'")
            if command_position and "=" in token and not token.startswith(("'", '"')):
                continue  # VAR=value before a command
            if command_position:
                if bare in BANNED_COMMANDS:
                    problems.append(f"{where}: `{bare}` is not allowed in the graders' scripts")
                elif bare in PYTHON_WORDS and bare != "python3":
                    problems.append(f"{where}: run Python as `python3`, not `{bare}`")
            if bare.startswith("/") or re.match(r"^~(/|$)", bare):
                problems.append(f"{where}: hard-coded absolute path {bare!r}")
            command_position = token in COMMAND_SEPARATORS or token.endswith(("$(", "`"))
    return problems


def grader_scripts(repo: str = REPO_ROOT) -> list[str]:
    return sorted(glob.glob(os.path.join(repo, "hw3_*.sh")))


def _script_entry_points(path: str, repo: str) -> list[str]:
    """Repository Python files started by `python3 X.py` or `python3 -m X` in a script."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    found = []
    for match in re.finditer(r"python3\s+(?:-m\s+([\w.]+)|-c\s+(['\"])(.*?)\2|([\w./-]+\.py))", text, re.S):
        module, _, inline, script = match.groups()
        if script:
            found.append(os.path.join(repo, script))
        elif module:
            found.append(os.path.join(repo, module.replace(".", os.sep) + ".py"))
        elif inline:
            for name in imported_names(inline):
                found.append(os.path.join(repo, name + ".py"))
    return [p for p in found if os.path.isfile(p)]


def imported_names(source: str) -> set[str]:
    """Top-level names of every module `source` imports anywhere (lazy imports in functions
    too); relative imports are left out."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def grader_modules(repo: str = REPO_ROOT) -> list[str]:
    """Every repository module the graders' scripts run, followed through imports."""
    todo = [p for s in grader_scripts(repo) for p in _script_entry_points(s, repo)]
    seen = set()
    while todo:
        path = os.path.abspath(todo.pop())
        if path in seen:
            continue
        seen.add(path)
        with open(path, encoding="utf-8") as f:
            source = f.read()
        try:
            names = imported_names(source)
        except SyntaxError:  # syntax this Python cannot parse (e.g. `match` on 3.8): ruff names it
            names = set()
        for name in names:
            candidate = os.path.join(repo, name + ".py")
            if os.path.isfile(candidate):
                todo.append(candidate)
    return sorted(seen)


def check_torch_apis(path: str) -> list[str]:
    problems = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            for api in NEW_TORCH_APIS:
                if api in line and "guarded" not in line:
                    problems.append(
                        f"{os.path.basename(path)}:{number}: `{api}` does not exist in torch 1.12.1; "
                        "add a fallback and mark the line `# guarded`")
    return problems


PINNED_LIBRARIES = ("torch", "torchvision", "timm", "clip")


def _library_aliases(tree: ast.AST) -> tuple:
    """({bound name: dotted library name}, {(first line, last line, dotted name) imported}) of every
    import from PINNED_LIBRARIES in `tree`, at any depth."""
    aliases, imported = {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PINNED_LIBRARIES:
                    imported.add((node.lineno, node.end_lineno, alias.name))
                    bound = alias.asname or alias.name.split(".")[0]
                    aliases[bound] = alias.name if alias.asname else bound
        elif (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
              and node.module.split(".")[0] in PINNED_LIBRARIES):
            for alias in node.names:
                imported.add((node.lineno, node.end_lineno, f"{node.module}.{alias.name}"))
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases, imported


def _dotted(node: ast.AST, aliases: dict):
    """The library name an expression such as `F.linear` reads; None where it reads none."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id in aliases:
        return ".".join([aliases[node.id], *reversed(parts)])
    return None


def library_names(source: str) -> list[tuple[int, int, str]]:
    """(first line, last line, dotted name) of every name `source` takes from PINNED_LIBRARIES: what it
    imports from them, and each attribute chain read from such an import or its alias (`F.linear`
    after `import torch.nn.functional as F`). Names bound at any depth count for the whole module."""
    tree = ast.parse(source)
    aliases, found = _library_aliases(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            dotted = _dotted(node, aliases)
            if dotted:
                found.add((node.lineno, node.end_lineno, dotted))
    return sorted(found)


def library_keywords(source: str) -> list[tuple[int, int, str, tuple]]:
    """(first line, last line, dotted name, keyword names) of every call of a PINNED_LIBRARIES name
    with keyword arguments (`nn.LayerNorm(C, bias=False)`); a `**mapping` names none."""
    tree = ast.parse(source)
    aliases, _ = _library_aliases(tree)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            dotted = _dotted(node.func, aliases)
            keywords = tuple(k.arg for k in node.keywords if k.arg)
            if dotted and keywords:
                found.add((node.lineno, node.end_lineno, dotted, keywords))
    return sorted(found)


def _resolve(dotted: str) -> tuple:
    """(whether `dotted` names something in the installed library, that thing): attributes, or
    submodules to import."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 2):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            return False, None
    return True, obj


def documented_parameters(obj):
    """Parameter names of a function written in C, from the signature lines of its docstring
    (`arange(start=0, end, step=1, *, out=None, dtype=None, ...) -> Tensor`), every overload given
    (`.. function:: sum(input, *, dtype=None)`); None where it documents none or takes **kwargs.
    A line counts when each of its comma-separated parts is a name, `*`, or a name with a default."""
    name = getattr(obj, "__name__", None)
    if not name:
        return None
    found = set()
    for match in re.finditer(rf"^\s*(?:\.\. function:: )?{re.escape(name)}\((.*)$", obj.__doc__ or "", re.M):
        line, parts, depth, start = match.group(1), [], 0, 0
        for i, ch in enumerate(line):
            if depth == 0 and ch in ",)":
                parts.append(line[start:i].split("=")[0].strip())
                start = i + 1
                if ch == ")":
                    break
            depth += 1 if ch in "([{" else -1 if ch in ")]}" else 0
        else:
            continue  # no closing parenthesis on the line
        if not re.fullmatch(r"\s*(->.*)?", line[start:]):
            continue
        if any(part.startswith("**") for part in parts):
            return None
        names = [part.lstrip("*") for part in parts if part.lstrip("*")]
        if names and all(part.isidentifier() for part in names):
            found.update(names)
    return found or None


def unknown_keywords(obj, keywords: tuple) -> list[str]:
    """The keywords a call of `obj` cannot take, by its Python signature or, for a function written in
    C, the signatures its docstring gives; none where it has neither or takes **kwargs."""
    try:
        parameters = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        named = documented_parameters(obj)
    else:
        if any(p.kind == p.VAR_KEYWORD for p in parameters):
            return []
        named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return [] if named is None else [k for k in keywords if k not in named]


def check_library_names(paths: list[str]) -> list[str]:
    """Each name `paths` take from the pinned libraries that the installed release lacks, and each
    keyword they pass one that its signature lacks, unless the lines say "guarded". Importing them
    here says nothing of use (clip's pkg_resources warning...)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _missing_library_names(paths)


def _missing_library_names(paths: list[str]) -> list[str]:
    problems, versions = [], {}

    def installed(root: str):
        if root not in versions:
            try:
                versions[root] = getattr(importlib.import_module(root), "__version__", "(no version)")
            except ImportError:
                versions[root] = None
                problems.append(f"{root} is not installed (pip install -r requirements.txt)")
        return versions[root]

    for path in paths:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        try:
            names, calls = library_names(source), library_keywords(source)
        except SyntaxError:  # named by ruff
            continue
        lines = source.splitlines()
        name = os.path.basename(path)
        for first, last, dotted in names:
            if any("guarded" in line for line in lines[first - 1:last]):
                continue
            version = installed(dotted.split(".")[0])
            if version is not None and not _resolve(dotted)[0]:
                problems.append(f"{name}:{first}: `{dotted}` does not exist in {dotted.split('.')[0]} {version}; "
                                "add a fallback and mark the line `# guarded`")
        for first, last, dotted, keywords in calls:
            if any("guarded" in line for line in lines[first - 1:last]):
                continue
            version = installed(dotted.split(".")[0])
            found, obj = _resolve(dotted) if version is not None else (False, None)
            if not found:  # not installed, or a missing name: reported above
                continue
            for keyword in unknown_keywords(obj, keywords):
                problems.append(f"{name}:{first}: `{dotted}` takes no keyword `{keyword}` in "
                                f"{dotted.split('.')[0]} {version}; add a fallback and mark the line `# guarded`")
    return problems


def _run_tool(argv: list[str]) -> list[str]:
    executable = shutil.which(argv[0])
    if executable is None:
        return [f"{argv[0]} is not installed (pip install -r requirements-dev.txt)"]
    result = subprocess.run([executable, *argv[1:]], capture_output=True, text=True, check=False)
    if result.returncode == 0:
        return []
    return [f"{' '.join(argv[:2])}: " + (result.stdout + result.stderr).strip()]


def check_python38(paths: list[str]) -> list[str]:
    """vermin, ruff, the torch-API scan and the pinned libraries' names over `paths`."""
    if not paths:
        return []
    problems = []
    problems += _run_tool(["vermin", "--target=3.8-", "--violations", "--no-tips", "--no-parse-comments", *paths])
    # pyflakes and the error classes, whatever this ruff's defaults are; syntax newer
    # than --target-version is reported as invalid-syntax regardless of --select
    problems += _run_tool(["ruff", "check", "--isolated", "--select", "E4,E7,E9,F", "--target-version", "py38",
                           "--no-cache", "--quiet", *paths])
    for path in paths:
        problems += check_torch_apis(path)
    return problems + check_library_names(paths)


def check_repository(repo: str = REPO_ROOT) -> list[str]:
    scripts = grader_scripts(repo)
    problems = [p for s in scripts for p in check_script(s)]
    return problems + check_python38(grader_modules(repo))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=REPO_ROOT, help="repository to check (default: this one)")
    args = parser.parse_args(argv)
    scripts = grader_scripts(args.repo)
    modules = grader_modules(args.repo)
    print("scripts:", ", ".join(os.path.basename(s) for s in scripts) or "none")
    print("graders' Python modules:", ", ".join(os.path.basename(m) for m in modules) or "none")
    problems = check_repository(args.repo)
    for problem in problems:
        print("FAIL", problem)
    print("script rules and Python 3.8 check:", "FAILED" if problems else "passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
