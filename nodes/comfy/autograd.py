"""Autograd through a loaded model: inference tensors turned into ordinary ones in place, and the
copy-on-write guard for tensors autograd saves while a model (Flux) writes in place."""

from __future__ import annotations

import contextlib
import weakref
from typing import Optional

import torch

Tensor = torch.Tensor


IN_PLACE_MODULES = ("comfy.ldm.flux.", "comfy.ldm.chroma.", "comfy.ldm.chroma_radiance.")


def adds_in_place(inner_model) -> bool:
    """Whether the diffusion model's forward modifies saved activations in place (the Flux family)."""
    dm = getattr(inner_model, "diffusion_model", None)
    return dm is not None and type(dm).__module__.startswith(IN_PLACE_MODULES)


def _under_functorch() -> bool:
    try:
        return torch._C._functorch.peek_interpreter_stack() is not None
    except AttributeError:
        return False


def _version(t: Tensor) -> Optional[int]:
    try:
        return int(t._version)
    except (RuntimeError, AttributeError):  # inference tensors keep no version counter
        return None


def _storage_key(t: Tensor) -> Optional[tuple]:
    try:
        if t.numel() == 0:
            return None
        return t.device, t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, AttributeError):
        return None


class _Saved:
    """What autograd holds for one saved tensor under a :class:`SavedTensorGuard`: the tensor itself
    (detached: the same memory and version counter, no reference back to the graph) and its version
    when saved, or the copy made before an in-place write."""

    __slots__ = ("tensor", "version", "copy", "__weakref__")

    def __init__(self, tensor: Tensor):
        self.tensor = tensor.detach()
        self.version = _version(tensor)
        self.copy: Optional[Tensor] = None


# in-place operations by name: Tensor methods and torch functions ending in "_" (add_, addcmul_,
# copy_, ...), the augmented assignments and item assignment; plus inplace=True and out= arguments
_IN_PLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                               "__imod__", "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__",
                               "__ilshift__", "__irshift__"})


def _written(func, args, kwargs) -> list:
    name = getattr(func, "__name__", "") or ""
    targets = []
    if ((name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_DUNDERS
            or kwargs.get("inplace") is True) and args and isinstance(args[0], Tensor):
        targets.append(args[0])
    out = kwargs.get("out")
    if out is not None:
        targets += [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, Tensor)]
    return targets


class _WriteWatch(torch.overrides.TorchFunctionMode):
    def __init__(self, guard: "SavedTensorGuard"):
        super().__init__()
        self.guard = guard

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.guard.live:
            for t in _written(func, args, kwargs):
                self.guard.before_write(t)
        return func(*args, **kwargs)


class SavedTensorGuard:
    """Copy on write for the tensors autograd saves during one model call, for models whose forward
    adds in place into tensors it saved (ComfyUI's Flux family: ``x += gate * out``).

    A saved tensor is kept as it is, uncopied, until an in-place operation (seen through a
    TorchFunctionMode: ``add_``, ``+=``, item assignment, ``inplace=True``, ``out=``) is about to write
    into its memory; only then is it copied, so the backward pass sees the values the forward used, as
    if the model were written out of place, with a bit-identical gradient. The weights every linear
    layer saves are never written, so never copied (nor GGUF weights, whose clone() returns
    themselves, nor weights ComfyUI's cast_to passes through). A saved tensor that something the guard
    did not see wrote into (its version counter moved) stops the backward pass with an error rather
    than a wrong gradient. ``copies`` and ``copied_bytes`` count the copies."""

    def __init__(self):
        self.live: dict = {}  # storage -> weak references to the _Saved entries that read it
        self.copies = 0
        self.copied_bytes = 0
        self._stack: Optional[contextlib.ExitStack] = None

    def __enter__(self) -> "SavedTensorGuard":
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack))
        stack.enter_context(_WriteWatch(self))
        self._stack = stack
        return self

    def __exit__(self, *exc):
        try:
            return self._stack.__exit__(*exc)
        finally:
            self._stack = None
            self.live.clear()  # writes after the call are not seen: the version check covers them

    def _pack(self, t: Tensor) -> _Saved:
        entry = _Saved(t)
        key = _storage_key(t)
        if key is not None:
            self.live.setdefault(key, []).append(weakref.ref(entry))
        return entry

    @staticmethod
    def _unpack(entry: _Saved) -> Tensor:
        if entry.copy is not None:
            return entry.copy
        if entry.version is not None and _version(entry.tensor) != entry.version:
            raise RuntimeError(
                "a tensor saved for the backward pass was modified in place by an operation the glue's "
                "SavedTensorGuard did not see (nodes/comfy/autograd.py); the gradient would be wrong.")
        return entry.tensor

    def before_write(self, t: Tensor) -> None:
        refs = self.live.pop(_storage_key(t), None)
        for ref in refs or ():
            entry = ref()
            if entry is None or entry.copy is not None:
                continue
            if entry.version is not None and _version(entry.tensor) != entry.version:
                continue  # already written unseen: the backward pass will stop at it
            with torch.no_grad():
                entry.copy = entry.tensor.clone()
            self.copies += 1
            self.copied_bytes += entry.copy.numel() * entry.copy.element_size()


def ordinary_copy(t: Tensor) -> Tensor:
    """A copy of ``t`` outside inference mode, of ``t``'s own tensor subclass with its attributes.

    The copy is made on the plain-tensor view: a subclass may return itself from ``clone()`` (ComfyUI-GGUF's
    GGMLTensor does, for its quantized bytes), which would leave the inference tensor in place. Its
    attributes (a GGMLTensor's tensor_type, tensor_shape and LoRA patches) are carried over, so the
    subclass dequantizes and patches the copy as it did the original."""
    with torch.inference_mode(False):
        copy = t.as_subclass(Tensor).clone()
    if type(t) not in (Tensor, torch.nn.Parameter):  # (a subclass's parameter keeps its own type)
        copy = copy.as_subclass(type(t))
        copy.__dict__.update(t.__dict__)
    return copy


def make_autograd_safe(module: torch.nn.Module) -> int:
    """Replace inference-tensor parameters and buffers of ``module`` in place by ordinary tensors
    with the same values (and the same tensor subclass: GGUF weights stay GGMLTensors), one tensor at a
    time. Returns how many were converted."""
    converted = 0
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(ordinary_copy(p), requires_grad=False)
                    converted += 1
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = ordinary_copy(b)
                    converted += 1
    return converted
