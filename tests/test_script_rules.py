"""The graders' script rules and the Python 3.8 check, on this repository and on planted violations."""
import os
import shutil

import pytest

import script_rules

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_repository_passes():
    assert script_rules.grader_scripts(), "no hw3_*.sh found"
    assert script_rules.check_repository(REPO) == []


def test_grader_modules_follow_imports():
    modules = {os.path.basename(p) for p in script_rules.grader_modules(REPO)}
    assert {"p1_zeroshot.py", "io_utils.py"} <= modules
    assert not any(name.startswith("test_") for name in modules)


def test_clean_script_passes(tmp_path):
    path = write(tmp_path, "hw3_9.sh", '#!/bin/bash\n# rm is fine in a comment\n'
                 'python3 p1_zeroshot.py "$1" "$2" "$3"\n'
                 'wget -O model.pt "https://example.com/a?b=1&c=2"\n'
                 'python3 -c "import clip; clip.load(\'ViT-B/32\')"\n')
    assert script_rules.check_script(path) == []


@pytest.mark.parametrize("line, words", [
    ("rm -rf cache", "`rm`"),
    ("sudo apt-get install x", "`sudo`"),
    ("cp a b", "`cp`"),
    ("mv a b", "`mv`"),
    ("mkdir -p out", "`mkdir`"),
    ("cd src && python3 x.py", "`cd`"),
    ("pip install torch", "`pip`"),
    ("python3 x.py && pip3 install y", "`pip3`"),
    ("python x.py", "`python3`, not `python`"),
    ("CUDA_VISIBLE_DEVICES=0 python3 x.py", "CUDA_VISIBLE_DEVICES"),
    ("wget -O m.pt https://example.com/a?b=1&c=2", "must be quoted"),
    ("URL=https://example.com/a?b=1&c=2", "must be quoted"),
    ("python3 /home/me/hw3/x.py", "absolute path"),
    ("echo ok; rm x", "`rm`"),
    ("x=$(mkdir y)", "`mkdir`"),
])
def test_each_violation_is_caught(tmp_path, line, words):
    path = write(tmp_path, "hw3_9.sh", "#!/bin/bash\n" + line + "\n")
    problems = script_rules.check_script(path)
    assert any(words in p for p in problems), problems


def test_non_bash_shebang(tmp_path):
    path = write(tmp_path, "hw3_9.sh", "#!/bin/zsh\npython3 x.py\n")
    assert any("not bash" in p for p in script_rules.check_script(path))


def test_planted_python_violations_are_caught(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("hw3_1.sh", "p1_zeroshot.py", "io_utils.py"):
        shutil.copy(os.path.join(REPO, name), repo / name)
    assert script_rules.check_repository(str(repo)) == []
    (repo / "helper.py").write_text(
        "import torch\n\n\ndef f(x):\n"
        "    return 'ab'.removeprefix('a'), torch.nn.functional.scaled_dot_product_attention(x, x, x)\n")
    with open(repo / "p1_zeroshot.py", "a") as f:
        f.write("\nimport helper  # noqa: F401\n")
    problems = "\n".join(script_rules.check_repository(str(repo)))
    assert "removeprefix" in problems  # vermin: str.removeprefix is 3.9+
    assert "scaled_dot_product_attention" in problems  # torch 2.x API
    (repo / "helper.py").write_text("def f(x):\n    match x:\n        case 1:\n            return 2\n")
    problems = "\n".join(script_rules.check_repository(str(repo)))
    assert "helper.py" in problems  # match statement is 3.10+


def test_names_missing_from_the_installed_libraries_are_caught(tmp_path):
    """Under `make test-graders` the installed releases are the graders' torch 1.12.1 and timm 0.9.10:
    then scaled_dot_product_attention (torch 2.0) is one of the names caught."""
    import torch.nn.functional

    path = write(tmp_path, "helper.py", (
        "import torch.nn.functional as F\n"
        "from torch import nn\n"
        "from timm.models import model_entrypoint\n"
        "\n\n"
        "def f(x):\n"
        "    y = F.layer_norm(x, x.shape[-1:]) + F.scaled_dot_product_attention(x, x, x)\n"
        "    return nn.NoSuchLayer, F.no_such_function(\n"
        "        y), model_entrypoint, F.also_missing(x)  # guarded\n"
        "\n\n"
        "def g():\n"
        "    from timm.no_such_module import thing\n"
        "    return thing\n"))
    problems = script_rules.check_library_names([path])
    missing = {p.split("`")[1]: p.split(":")[1] for p in problems}
    # F.also_missing's line says "guarded"; F.no_such_function's does not (its call ends on that line)
    expected = {"torch.nn.NoSuchLayer": "8", "torch.nn.functional.no_such_function": "8",
                "timm.no_such_module.thing": "13"}
    if not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        expected["torch.nn.functional.scaled_dot_product_attention"] = "7"
    assert missing == expected, problems
    assert all(p.startswith("helper.py:") and "does not exist in" in p and "# guarded" in p for p in problems)


def test_keywords_the_installed_libraries_do_not_take_are_caught(tmp_path):
    """A keyword is checked against the Python signature, or for a function written in C against the
    signatures its docstring gives. Under `make test-graders` (torch 1.12.1) `nn.LayerNorm(..., bias=)`,
    new in torch 2.1, is one of the calls caught."""
    import inspect

    from torch import nn

    path = write(tmp_path, "helper.py", (
        "import timm\n"
        "import torch\n"
        "import torch.nn.functional as F\n"
        "from torch import nn\n"
        "\n\n"
        "def f(x, options):\n"
        "    norm = nn.LayerNorm(4, eps=1e-6, made_up=True)\n"
        "    y = torch.zeros(3, dtype=torch.float32, also_made_up=1) + F.linear(x, x, bias=None)\n"
        "    z = torch.zeros(3, not_checked=1)  # guarded\n"
        "    model = timm.create_model('vit_tiny_patch16_224', anything=1)\n"  # **kwargs takes any keyword
        "    return norm, y, z, model, nn.LayerNorm(4, **options), nn.LayerNorm(4, bias=False)\n"))
    problems = script_rules.check_library_names([path])
    caught = {(p.split(":")[1], p.split("`")[1], p.split("`")[3]) for p in problems}
    expected = {("8", "torch.nn.LayerNorm", "made_up"), ("9", "torch.zeros", "also_made_up")}
    if "bias" not in inspect.signature(nn.LayerNorm).parameters:
        expected.add(("12", "torch.nn.LayerNorm", "bias"))
    assert caught == expected, problems
    assert all("takes no keyword" in p and "# guarded" in p for p in problems)


class _Builtin:
    """Stands for a function written in C: a name and a docstring, no Python signature."""

    def __init__(self, name, doc):
        self.__name__, self.__doc__ = name, doc


@pytest.mark.parametrize("doc, expected", [
    ("amax(input, dim, keepdim=False, *, out=None) -> (Tensor, LongTensor)\n\nText.\n",
     {"input", "dim", "keepdim", "out"}),
    # every overload counts; example output (`amax([1, 2])`) and prose are not signatures
    ("amax(input) -> Tensor\n\nExample::\n    >>> amax(x)\n    amax([1, 2])\n\n"
     ".. function:: amax(input, dim=(0, 1), *, dtype=None) -> Tensor\n   :noindex:\n",
     {"input", "dim", "dtype"}),
    ("amax(*args, **kwargs) -> Tensor\n", None),  # takes any keyword
    ("Returns the largest value; see amax(input) for the details.\n", None),
    (None, None),
])
def test_documented_parameters_read_the_signature_lines(doc, expected):
    assert script_rules.documented_parameters(_Builtin("amax", doc)) == expected
    if expected:
        assert script_rules.unknown_keywords(_Builtin("amax", doc), ("dim", "made_up")) == ["made_up"]
