"""Fused decode products of TTQ layers that read the same input (TTQ paper, Section 2 eq. 3, prompt mode).

q/k/v of an attention block (and gate/up of a gated MLP) multiply the same ``x``.  TTQ's diagonal
``s`` is a function of the layer's input statistic only, so in prompt mode all of them are packed
with the same ``s`` (and, for the int8-activation layouts, the same rounding of ``x / s``): their
packed rows can be stacked into one packed weight and multiplied by one kernel call::

    [y_q; y_k; y_v] = deq([Wq_q; Wq_k; Wq_v]) (x / s)          # (d_q + d_k + d_v, d_in) rows

Every output row is computed by the same code on the same bytes, so the fused product returns the
unfused outputs bit for bit.  Per decode token of SmolLM2-135M (30 blocks) this is 120 kernel calls
instead of 210 (+ the head): 90 fewer prologues (``x / s``, its int8 rounding, the group sums), output
allocations and bindings crossed, and products large enough to split across threads.

:func:`fuse_shared_inputs` wraps each member of a group (:data:`SHARED_INPUTS`: which sibling linears
read one input, architecture knowledge as data) in a :class:`SharedInputLinear`.  The model's own
forward is unchanged: the first member called with a one-token ``x`` runs the group's fused product
and keeps the outputs; its siblings called with the same tensor (same object, same version) return
their slice.  Anything else -- a prefill, ``refresh_every``, the reference path, a rank-r term,
members packed differently -- runs the member's own forward.  The fused weight is stacked once per
prompt, at its first decode step.  :func:`unfuse` puts the members back.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from ttq.kernels.api import PackedLinear, PackedWeight, log_once
from ttq.nn.linear import TTQLinear

# Sibling linears (last name component) that multiply the same input, per block, in the families we know:
# Llama / SmolLM2 / Mistral / Qwen2/3 / Gemma / OPT attention, gated MLPs.
SHARED_INPUTS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
)


class FusedGroup:
    """The stacked packed product of TTQ layers sharing an input, re-stacked when they re-quantize.

    Args:
        members: the TTQLinear layers in output order.
    """

    def __init__(self, members: list[TTQLinear]) -> None:
        self.members = members
        self._tried: tuple = ()  # the members' PackedLinear objects last stacked (or found not fusable)
        self._bound: tuple | None = None  # ... when the stacking succeeded
        self._product = None  # the fused one-token product (x -> (..., sum d_out) or None)
        self._sizes: list[int] = []
        self._x: torch.Tensor | None = None  # the last input and its outputs (per member)
        self._version = -1
        self._ys: tuple[torch.Tensor, ...] = ()

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor | None:
        """Member ``index``'s output for ``x`` from the fused product, or None when it does not apply."""
        if x is self._x and x._version == self._version and self._bound[index] is self.members[index].prompt.linear:
            return self._ys[index]  # a sibling already ran the fused product on this very tensor
        if x.dim() >= 2 and x.shape[-2] != 1:  # a prefill: the members quantize for the new prompt
            return None
        lins = self._linears()
        same = len(self._tried) == len(lins) and all(a is b for a, b in zip(self._tried, lins))
        if not (self._stack(lins) if not same else self._bound is not None):
            return None
        y = self._product(x)  # None for inputs the one-token product does not take
        if y is None:
            return None
        ys = tuple(t if t.is_contiguous() else t.contiguous() for t in y.split(self._sizes, dim=-1))
        self._x, self._version, self._ys = x, x._version, ys
        return ys[index]

    def _linears(self) -> tuple:
        return tuple(m.prompt.linear if m.mode == "prompt" else None for m in self.members)

    def _stack(self, lins: tuple) -> bool:
        """Stack the members' current packed products ``lins`` into one; False when they cannot be fused."""
        self._bound, self._product, self._x, self._ys = None, None, None, ()
        self._tried = lins
        if any(lin is None or lin.decoder is None for lin in lins):  # no prompt packed, refresh, reference path
            return False
        why = fusable(lins)
        if why is not None:
            log_once(f"TTQ products sharing an input are not fused: {why}")
            return False
        first = lins[0]
        packed = stack_packed([lin.packed for lin in lins])
        bias = None
        if any(lin.bias is not None for lin in lins):
            bias = torch.cat([lin.bias.float() if lin.bias is not None else
                              torch.zeros(lin.packed.shape[0], device=lin.packed.device) for lin in lins])
        self._product = first.kernel.decoder(packed, first.s, bias, None, None)
        if self._product is None:
            return False
        self._sizes = [lin.packed.shape[0] for lin in lins]
        self._bound = lins
        return True


def fusable(lins: Iterable[PackedLinear]) -> str | None:
    """None when these bound products can run as one stacked product, else why not."""
    lins = list(lins)
    p0, s0 = lins[0].packed, lins[0].s
    for lin in lins[1:]:
        p = lin.packed
        if (p.layout, p.bits, p.group_size, p.fmt, p.shape[1]) != (p0.layout, p0.bits, p0.group_size, p0.fmt, p0.shape[1]):
            return "members packed in different layouts or formats"
        if p.scale.dtype != p0.scale.dtype or (p.zero is None) != (p0.zero is None):
            return "members store scale / zero in different dtypes"
        if not torch.equal(lin.s, s0):
            return "members have different scales s"
    if any(lin.b is not None for lin in lins):
        return "a rank-r term (the factors stay per layer)"
    if not hasattr(lins[0].kernel, "decoder"):
        return f"layout {p0.layout!r} has no one-token product"
    return None


def stack_packed(parts: list[PackedWeight]) -> PackedWeight:
    """One packed weight holding the rows of ``parts`` in order (same layout, format and d_in; rows are
    independent in every packed layout, so stacking codes, scales and zeros along rows is exact)."""
    p0 = parts[0]
    cat = (lambda ts: torch.cat([t.reshape(t.shape[0], -1) for t in ts]))
    d_out = sum(p.shape[0] for p in parts)
    return PackedWeight(p0.layout, p0.bits, p0.group_size, (d_out, p0.shape[1]), cat([p.qweight for p in parts]),
                        cat([p.scale for p in parts]), None if p0.zero is None else cat([p.zero for p in parts]), p0.fmt)


class SharedInputLinear(nn.Module):
    """A TTQ layer of a :class:`FusedGroup`: its decode steps read the group's fused product.

    Args:
        inner: the wrapped layer (a child: ``set_mode`` / ``reset`` / ``restore_`` find it); group, index: its
            group and its position there.
    """

    def __init__(self, inner: TTQLinear, group: FusedGroup, index: int) -> None:
        super().__init__()
        self.inner = inner
        self.index = index
        self.__dict__["group"] = group  # not a submodule: the group is shared by the siblings
        self.in_features, self.out_features = inner.in_features, inner.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # the group's cache of sibling outputs is Python state: in a compiled
            return self.inner(x)  # decode step (ttq.compiled) each member runs its own product
        if getattr(self.inner, "mode", None) == "prompt":
            y = self.group.output(x, self.index)
            if y is not None:
                return y
        return self.inner(x)


def fuse_shared_inputs(model: nn.Module, groups: Iterable[tuple[str, ...]] = SHARED_INPUTS) -> int:
    """Wrap every complete group of sibling TTQ layers that read one input (``groups``) for fused decoding.

    Args:
        model: a model quantized with ``ttq.quantize_(model, TTQConfig(...))`` (prompt mode at decode time).
        groups: sibling names per group (:data:`SHARED_INPUTS`).
    Returns:
        the number of groups fused.
    """
    n = 0
    for parent in list(model.modules()):
        for names in groups:
            members = [getattr(parent, name, None) for name in names]
            if not all(isinstance(m, TTQLinear) for m in members):
                continue
            if len({m.in_features for m in members}) != 1:
                continue
            group = FusedGroup(members)
            for i, (name, m) in enumerate(zip(names, members)):
                setattr(parent, name, SharedInputLinear(m, group, i))
            n += 1
    return n


def unfuse(model: nn.Module) -> int:
    """Put the layers wrapped by :func:`fuse_shared_inputs` back; returns how many were unwrapped."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SharedInputLinear):
                setattr(parent, name, child.inner)
                n += 1
    return n
