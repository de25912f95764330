"""The installed environment can do what requirements.txt promises.

A release of a dependency can break a pinned package without any import
error: timm 0.9.10 catches the ImportError of a too-new huggingface_hub and
quietly turns its hub downloads off, so `hw3_download.sh` failed only on the
student's machine. These tests run against what `pip install -r
requirements.txt` actually installed.
"""
import importlib
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# distribution name in requirements.txt -> the module the code imports
IMPORT_NAMES = {"clip-anytorch": "clip", "Pillow": "PIL", "setuptools": "pkg_resources",
                "huggingface_hub": "huggingface_hub", "pycocoevalcap": "pycocoevalcap.cider.cider",
                "fpdf2": "fpdf"}


def requirement_names():
    names = []
    with open(os.path.join(REPO, "requirements.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-"):
                names.append(line.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip())
    return names


@pytest.mark.parametrize("name", requirement_names())
def test_every_requirement_imports(name):
    importlib.import_module(IMPORT_NAMES.get(name, name.replace("-", "_")))


def test_timm_hub_support_is_on():
    """timm can download from the hub (what `hw3_cache.py encoder` needs)."""
    from timm.models import _hub

    assert _hub._has_hf_hub, (
        "timm's hub support is off: huggingface_hub is too new for timm 0.9.10 "
        "(it needs huggingface_hub.repo_type_and_id_from_hf_id); see requirements.txt")
