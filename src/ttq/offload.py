"""Models bigger than memory: models dispatched by accelerate (``from_pretrained(..., device_map="auto",
max_memory=..., offload_folder=...)``, :func:`dispatch_kwargs`).

accelerate puts each offloaded layer's parameters on the ``meta`` device and attaches an ``AlignDevicesHook``
whose ``weights_map`` (a lazy mapping over the checkpoint's safetensors files, the offload folder's memory
maps or a CPU state dict) loads them onto the hook's execution device for the layer's forward and drops
them after it.  This module is the one place ttq deals with that:

* :func:`execution_device`: where a model's inputs go (``next(model.parameters()).device`` is ``meta``
  for an offloaded first parameter);
* :func:`onloaded`: a layer's weights on its execution device for the duration of a ``with`` block (the
  hook's own ``pre_forward`` / ``post_forward``, as ``accelerate.utils.align_module_device`` does), so a
  method's handler builds its module from real numbers, one layer at a time;
* :func:`offload_like`: after a module was built from an onloaded layer, the tensors it *shares* with the
  layer (the full-precision ``weight`` that test-time methods keep by design, a ``bias``) go back to
  ``meta`` and a hook of the same kind fetches them at the module's forward from the layer's own
  ``weights_map`` (no copy); what the method made (codes, scales, factors) is small and stays resident on
  the execution device.  The layer itself, with its hook, stays the module's ``.original``, so
  :func:`ttq.patch.restore_` gives back a model that still runs offloaded;
* :func:`readable`: the value of a ``meta`` tensor read through the hook that loads it (fingerprints,
  the NaN check at load), one tensor at a time.

Quantized modules cache full-size tensors derived from their weights (:data:`DERIVED_CACHES`: TTQ's ``W - B A``,
a static layer's dequantized weight); for a layer that was offloaded these caches are dropped after every
forward, so that no full-size tensor stays resident (an offloaded static layer dequantizes its codes at each
forward, as the unquantized layer loaded its weight at each forward).
"""

from __future__ import annotations

import atexit
import functools
import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from ttq.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

# Attributes in which quantized modules cache a full-size tensor derived from their weights (``TTQLinear`` /
# ``LowRankTTQLinear``: ``W - B A`` in float32; static layers, ``DequantCachedLinear``: the dequantized weight);
# for a layer that was offloaded they are dropped after each forward, as its weights were.
DERIVED_CACHES = ("_residual", "_w_cache")


def offload_hook(module: nn.Module):
    """The accelerate ``AlignDevicesHook`` that offloads ``module``'s own tensors, or None.

    A hook chained with others (accelerate's ``SequentialHook``) is looked for among them.
    """
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return None
    from accelerate.hooks import AlignDevicesHook

    for h in getattr(hook, "hooks", (hook,)):
        if isinstance(h, AlignDevicesHook) and h.offload and h.weights_map is not None:
            return h
    return None


def is_offloaded(model: nn.Module) -> bool:
    """Whether any module of ``model`` has parameters offloaded by accelerate (loaded at forward time)."""
    return any(offload_hook(m) is not None for m in model.modules())


def execution_device(model: nn.Module) -> torch.device:
    """The device on which ``model`` takes its inputs.

    For a model dispatched by accelerate, the execution device of the hook on the model itself (accelerate
    moves the inputs there); otherwise the device of the first parameter or buffer that is not ``meta``;
    the CPU when there is none.
    """
    hook = getattr(model, "_hf_hook", None)
    for h in getattr(hook, "hooks", (hook,)) if hook is not None else ():
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(dev)
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def _direct_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s own parameters and buffers (not its children's), by name."""
    return {**{n: b for n, b in module.named_buffers(recurse=False)},
            **{n: p for n, p in module.named_parameters(recurse=False)}}


@contextmanager
def onloaded(module: nn.Module, name: str = "") -> Iterator[None]:
    """``module``'s offloaded weights on its execution device inside the block, back on ``meta`` after it.

    A module that is not offloaded is left as it is.

    Args:
        module: a layer, possibly with an accelerate offload hook.
        name: its name, for the error message.
    Raises:
        ModelError: a tensor of ``module`` is on ``meta`` and no offload hook of its own loads it (e.g. fused MoE
            experts of an offloaded block, weights placed by a hook on an ancestor, ``init_empty_weights``).
    """
    hook = offload_hook(module)
    if hook is not None:
        hook.pre_forward(module)
    try:
        meta = [n for n, t in _direct_tensors(module).items() if t.device.type == "meta"]
        if meta:
            raise ModelError(
                f"layer {name or type(module).__name__!r} has its {', '.join(meta)} on the meta device and no accelerate "
                "offload hook of its own that loads it; ttq quantizes offloaded linear layers (nn.Linear, Conv1D) each "
                "with its own AlignDevicesHook, as from_pretrained(device_map='auto', max_memory=...) dispatches them; "
                "load this model without offloading, or leave the layer out (filter_fn / overrides)"
            )
        yield
    finally:
        if hook is not None:
            hook.post_forward(module, None)


class _SharedWeights(Mapping):
    """The ``weights_map`` of a module built from an offloaded layer: each of its tensors by name, read from the
    layer's own ``weights_map`` (transposed where the module holds a transposed view, e.g. a ``Conv1D``'s), or
    the module's own resident tensor for the others."""

    def __init__(self, source: Mapping, shared: dict[str, tuple[str, bool]], own: dict[str, torch.Tensor]) -> None:
        self.source, self.shared, self.own = source, shared, own

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self.own:
            return self.own[key]
        name, transposed = self.shared[key]
        value = self.source[name]
        return value.t() if transposed else value

    def __iter__(self):
        return iter([*self.shared, *self.own])

    def __len__(self) -> int:
        return len(self.shared) + len(self.own)


@functools.cache
def _fetch_hook_class() -> type:
    from accelerate.hooks import AlignDevicesHook

    class FetchSharedHook(AlignDevicesHook):
        """accelerate's hook for a module built from an offloaded layer: it loads the tensors the module shares
        with the layer for each forward (``offload=True``), then forgets them and every full-size tensor the
        module derived for that forward (:data:`DERIVED_CACHES`)."""

        def post_forward(self, module, output):
            output = super().post_forward(module, output)
            for attr in DERIVED_CACHES:
                if getattr(module, attr, None) is not None:
                    setattr(module, attr, None)
            return output

    return FetchSharedHook


def _share(t: torch.Tensor, sources: dict[str, torch.Tensor]) -> tuple[str, bool] | None:
    """``(name, transposed)`` of the onloaded tensor in ``sources`` that ``t`` is (or views transposed), or None;
    a tensor that shares memory with one in another way is refused."""
    for name, s in sources.items():
        if t.device != s.device or t.untyped_storage().data_ptr() != s.untyped_storage().data_ptr():
            continue
        if t.storage_offset() == s.storage_offset() and t.shape == s.shape and t.stride() == s.stride():
            return name, False
        if (t.dim() == 2 and s.dim() == 2 and t.storage_offset() == s.storage_offset()
                and t.shape == s.shape[::-1] and t.stride() == s.stride()[::-1]):
            return name, True
        raise ModelError(f"a module built from an offloaded layer holds a view of its {name!r} of shape "
                         f"{tuple(t.shape)} (the layer's: {tuple(s.shape)}) that ttq cannot fetch at forward time")
    return None


def offload_like(new: nn.Module, original: nn.Module) -> int:
    """Make ``new``, built from ``original`` inside :func:`onloaded`, fetch the tensors it shares with the
    offloaded ``original`` at forward time instead of keeping them resident.

    Every module inside ``new`` that holds such a tensor (not ``original`` itself, which keeps its own hook)
    gets an accelerate offload hook: the shared tensors go to ``meta`` and are read from ``original``'s
    ``weights_map`` (no copy) for each forward; after it they, and :data:`DERIVED_CACHES`, are dropped.
    ``new`` itself gets such a hook even when it shares nothing (codes only): it drops its caches.
    Call it while ``original`` is still onloaded.

    Args:
        new: the module that replaces ``original`` (its ``.original`` is ``original``, or a view of it).
        original: a layer with an accelerate offload hook, currently onloaded.
    Returns:
        How many tensors of ``new`` are fetched at forward time.
    """
    hook = offload_hook(original)
    if hook is None:
        return 0
    from accelerate.hooks import add_hook_to_module

    sources = _direct_tensors(original)
    hooked = [n for n, m in new.named_modules() if offload_hook(m) is not None]  # original (or a layer inside it)
    hook_class = _fetch_hook_class()
    count = 0
    for mname, mod in new.named_modules():
        if any(h == "" or mname == h or mname.startswith(f"{h}.") for h in hooked):
            continue  # loads its own tensors
        params = dict(mod.named_parameters(recurse=False))
        shared = {n: s for n, p in params.items() if (s := _share(p, sources)) is not None}
        for n, b in mod.named_buffers(recurse=False):
            if _share(b, sources) is not None:
                raise ModelError(f"{type(mod).__name__}.{n}: a buffer that shares memory with an offloaded layer's "
                                 "weight cannot be fetched at forward time; register it as a parameter")
        if not shared and mname != "":
            continue
        own = {n: p for n, p in params.items() if n not in shared}
        weights = _SharedWeights(hook.weights_map, shared, own) if shared else None
        add_hook_to_module(mod, hook_class(execution_device=hook.execution_device, offload=bool(shared),
                                           weights_map=weights, skip_keys=hook.skip_keys))
        count += len(shared)
    return count


def readable(model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (the state-dict entry ``name`` of ``model``) itself, or, when it is on ``meta``, its value read
    through the accelerate hook that loads it (the module's own, or an ancestor's that places its submodules).

    Raises:
        ModelError: a ``meta`` tensor that no hook loads.
    """
    if tensor.device.type != "meta":
        return tensor
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        hook = offload_hook(model.get_submodule(".".join(parts[:i])))
        if hook is not None and (i == len(parts) - 1 or hook.place_submodules):
            value = hook.weights_map[".".join(parts[i:])]
            return value.to(tensor.dtype) if value.is_floating_point() and value.dtype != tensor.dtype else value
    raise ModelError(f"{name} is on the meta device and no accelerate offload hook loads it: its value is unknown")


def named_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.named_parameters()`` with offloaded parameters read through their hooks, one at a time."""
    for name, p in model.named_parameters():
        yield name, readable(model, name, p)


# ---------------------------------------------------------------------------------------------- loading


def offload_folder() -> Path:
    """A fresh folder under ``<ttq cache>/offload`` for the weights accelerate offloads to disk, removed at exit.

    (A checkpoint in safetensors is read in place; the GGUF models' dequantized weights are written here.)
    """
    from ttq.cache import cache_root

    root = cache_root() / "offload"
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="run-", dir=root))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def memory_bytes(size: str | int) -> int:
    """``"200MB"``, ``"1.5GiB"``, ``"300KB"`` or a byte count -> bytes (accelerate's units).

    Raises:
        ConfigError: not a size, or not positive.
    """
    from accelerate.utils import convert_file_size_to_int

    try:
        n = convert_file_size_to_int(int(size) if isinstance(size, str) and size.isdigit() else size)
    except (ValueError, AttributeError):
        n = -1
    if n <= 0:
        raise ConfigError(f"memory size {size!r}: give a positive number of bytes or a size with a unit "
                          "(KB, MB, GB, KiB, MiB, GiB), e.g. 200MB")
    return n


def dispatch_kwargs(max_memory: str | int, device: str | torch.device = "cpu") -> dict:
    """``from_pretrained`` keywords that let accelerate place a model in at most ``max_memory`` on ``device``.

    On the CPU the weights beyond ``max_memory`` go to disk (:func:`offload_folder`); on an accelerator they go
    to CPU memory, and beyond that to disk.  Offloaded layers run on ``device``.

    Args:
        max_memory: the budget of the weights on ``device`` (:func:`memory_bytes`).
        device: the (checked) device the model runs on.
    Returns:
        ``{"device_map": "auto", "max_memory": {...}, "offload_folder": ...}``.
    """
    budget = memory_bytes(max_memory)
    dev = torch.device(device)
    if dev.type == "cpu":
        memory: dict = {"cpu": budget}
    else:
        from accelerate.utils import get_max_memory

        memory = {"mps" if dev.type == "mps" else dev.index or 0: budget, "cpu": get_max_memory()["cpu"]}
    folder = offload_folder()
    logger.info("weights beyond %s on %s are offloaded by accelerate (disk: %s)", max_memory, dev, folder)
    return {"device_map": "auto", "max_memory": memory, "offload_folder": str(folder)}
