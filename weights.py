"""Building a model from weights files without wasted work.

A module's constructor initialises every parameter, and loading then
overwrites them: for ViT-L's 300M weights the random draws cost several
times what reading the file does. `skip_init()` builds modules without
initialising them (their tensors are allocated, never written), and
`assign_state()` puts a file's tensors in their place (no copy when dtype and
device already match) and returns the names that received nothing, which the
caller must treat as an error or fill itself: an uninitialised tensor is
garbage. Both work on torch 1.12, which has no meta-device context.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

# torch layers that initialise themselves in reset_parameters(), and the initialisers modules call
_SELF_INITIALISING = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.modules.conv._ConvNd)
_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                 "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                 "sparse_")


def _leave_as_is(tensor, *args, **kwargs):
    return tensor


def _no_reset(self) -> None:
    return None


@contextlib.contextmanager
def skip_init(enabled: bool = True):
    """Modules built inside do not initialise their parameters (nor draw random numbers for them).

    Only for a model whose every parameter is then loaded (`assign_state`, with its
    list of what received nothing checked). Layers that initialise themselves
    otherwise (torch.randn in a constructor) still do.
    """
    if not enabled:
        yield
        return
    patches = [(cls, "reset_parameters", _no_reset) for cls in _SELF_INITIALISING]
    patches += [(nn.MultiheadAttention, "_reset_parameters", _no_reset)]
    patches += [(nn.init, name, _leave_as_is) for name in _INITIALISERS if hasattr(nn.init, name)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def _owner(module: nn.Module, name: str) -> tuple:
    """'blocks.3.attn.qkv.weight' -> (the submodule blocks.3.attn.qkv, 'weight')"""
    path, _, leaf = name.rpartition(".")
    for part in path.split(".") if path else ():
        module = getattr(module, part)
    return module, leaf


def assign_state(module: nn.Module, state: dict, source: str, device=None) -> list:
    """Put `state`'s tensors into `module` in place of its parameters and buffers of the same
    names, each converted to the dtype it replaces (and to `device`, default: where it was).

    Raises ValueError in one line for a name the module does not have or a shape other than
    the module's (naming `source`, the tensor and both shapes). Returns the sorted names of
    the module's tensors that received nothing.
    """
    targets = dict(module.named_parameters())
    targets.update(module.named_buffers())
    unknown = sorted(set(state) - set(targets))
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} tensor(s) the model does not have, e.g. {unknown[:3]}")
    for name, tensor in state.items():
        old = targets[name]
        if tuple(tensor.shape) != tuple(old.shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(old.shape)}")
    with torch.no_grad():
        for name, tensor in state.items():
            old = targets[name]
            new = tensor.to(device=old.device if device is None else device, dtype=old.dtype).contiguous()
            owner, leaf = _owner(module, name)
            if isinstance(old, nn.Parameter):
                owner._parameters[leaf] = nn.Parameter(new, requires_grad=old.requires_grad)
            else:
                owner._buffers[leaf] = new
    return sorted(set(targets) - set(state))
