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
forward is unchanged.  Once every member has packed the current prompt (at the end of the eager
prefill), the group copies their packed rows into one stacked weight and gives the members row views of
it back (no second copy of the weights); later prompts, after a reset too, are packed straight into those
views (``PromptState.reuse``), so only a group's first prompt pays the copy.  A decode step then runs the
stacked product:

* eagerly, the first member called with a one-token ``x`` runs it and keeps the outputs; its siblings
  called with the same tensor (same object, same version) return their slice;
* in a compiled decode step (:mod:`ttq.compiled`) every member calls the same registered op on the same
  graph inputs and takes its slice: :func:`ttq.compiled.merge_same_products`, a post-grad pass of the compiled
  step, keeps one of those calls.

Members that cannot share one product keep their own: different layouts or formats, a rank-r term,
``refresh_every``, the reference path, on-the-fly refinements (their ``s`` is chosen per layer).
These are fixed by the configuration, so a compiled step traced fused stays valid for every prompt;
members whose scale / zero came out in different dtypes (a float16 overflow falls back to float32
for one layer) are stacked in float32, which holds both exactly.  :func:`unfuse` puts the members back.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
import torch.nn as nn

from ttq.kernels.api import PackedLinear, PackedWeight, _bind, log_once
from ttq.nn.linear import TTQLinear

# Sibling linears (last name component) that multiply the same input, per block, in the families we know:
# Llama / SmolLM2 / Mistral / Qwen2/3 / Gemma / OPT attention, gated MLPs.
SHARED_INPUTS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
)


class FusedGroup:
    """The stacked packed product of TTQ layers sharing an input, re-stacked for each prompt.

    Args:
        members: the TTQLinear layers in output order.
    """

    # per-prompt and per-step state (ttq.compiled.state_key leaves it out: same shapes for every prompt)
    PER_PROMPT = ("linear", "_synced", "_x", "_version", "_ys")

    def __init__(self, members: list[TTQLinear]) -> None:
        self.members = members
        self.sizes = [m.out_features for m in members]
        self.linear: PackedLinear | None = None  # the stacked product of the current prompt, or None
        self._synced: tuple = ()  # the members' PackedLinear objects it was built from
        self._x: torch.Tensor | None = None  # the last eager input and its outputs (per member)
        self._version = -1
        self._ys: tuple[torch.Tensor, ...] = ()

    def drop(self) -> None:
        """Forget the stacked product (the members dropped or replaced theirs: :func:`drop_stacks`)."""
        self.linear, self._synced, self._x, self._ys = None, (), None, ()

    def current(self) -> bool:
        """True when :attr:`linear` is the stacked product of the members' current packed products."""
        return self.linear is not None and all(a is b for a, b in zip(self._synced, self._linears()))

    def sync(self) -> bool:
        """Stack the members' packed products once all of them hold the same prompt's; True when
        :attr:`linear` is current afterwards.  Called after each member's prefill (cheap until the last)."""
        if self.current():
            return True
        self.drop()
        lins = self._linears()
        if any(lin is None for lin in lins) or len({m.prompt.n_quantizations for m in self.members}) != 1:
            return False  # a prompt is being packed (some members still hold the previous one)
        why = fusable(lins, [m.prompt.refiner is not None for m in self.members])
        if why is not None:
            log_once(f"TTQ products sharing an input are not fused: {why}")
            return False
        s0 = lins[0].s
        if not all(torch.equal(lin.s, s0) for lin in lins[1:]):  # one input, one statistic: never expected
            raise RuntimeError("layers fused for sharing an input were packed with different TTQ scales s; "
                               "call ttq.nn.fused.unfuse(model) to run them separately")
        t0 = time.perf_counter()
        packed = _stacked_in_place([lin.packed for lin in lins])
        if packed is None:  # fresh packings: copy them into one stack, give the members row views of it
            packed = stack_packed([lin.packed for lin in lins])
            views = row_views(packed, [lin.packed for lin in lins])
            for m, lin, view in zip(self.members, lins, views):
                m.prompt.linear = _bind(view, lin.s, lin.bias, lin.b, lin.a, lin.decoder is not None, False,
                                        lin.kernel)
                m.prompt.reuse = view  # the next prompt, after a reset too, is packed into the stack in place
            lins = self._linears()
        bias = None
        if any(lin.bias is not None for lin in lins):
            bias = torch.cat([lin.bias.float() if lin.bias is not None else
                              torch.zeros(lin.packed.shape[0], device=lin.packed.device) for lin in lins])
        self.linear = _bind(packed, s0, bias, None, None, True, False, lins[0].kernel)
        self._synced = lins
        self.members[0].prompt.seconds += time.perf_counter() - t0  # prompt-mode packing time, honestly counted
        return True

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor | None:
        """Member ``index``'s output for a one-token ``x`` from the stacked product (eager), or None when it
        does not apply (a prefill, no current stack)."""
        if x is self._x and x._version == self._version and self.current():
            return self._ys[index]  # a sibling already ran the fused product on this very tensor
        if x.dim() >= 2 and x.shape[-2] != 1:  # a prefill: the members quantize for the new prompt
            return None
        if not self.sync() or self.linear.decoder is None:
            return None
        y = self.linear.decoder(x)  # None for inputs the one-token product does not take
        if y is None:
            return None
        ys = tuple(t if t.is_contiguous() else t.contiguous() for t in y.split(self.sizes, dim=-1))
        self._x, self._version, self._ys = x, x._version, ys
        return ys[index]

    def traced(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Member ``index``'s output in a compiled step: its slice of the stacked product (every member
        traces the same op on the same inputs; :func:`ttq.compiled.merge_same_products` keeps one call)."""
        start = sum(self.sizes[:index])
        return self.linear(x)[..., start:start + self.sizes[index]]

    def _linears(self) -> tuple:
        return tuple(m.prompt.linear if m.mode == "prompt" else None for m in self.members)


def fusable(lins: Iterable[PackedLinear], refined: Iterable[bool] = ()) -> str | None:
    """None when these bound products can run as one stacked product, else why not (reasons fixed by the
    configuration: layouts, formats, rank-r terms, bound decoders, refinements).  ``refined``: per member,
    whether on-the-fly refinements chose its packing."""
    lins = list(lins)
    p0 = lins[0].packed
    if any(refined):
        return "on-the-fly refinements choose s per layer"
    if any(lin.decoder is None for lin in lins):
        return "no one-token product bound (refresh_every, the reference path, or no kernel here)"
    for lin in lins[1:]:
        p = lin.packed
        if (p.layout, p.bits, p.group_size, p.fmt, p.shape[1]) != (p0.layout, p0.bits, p0.group_size, p0.fmt, p0.shape[1]):
            return "members packed in different layouts or formats"
        if (p.zero is None) != (p0.zero is None):
            return "members store zero points differently"
    if any(lin.b is not None for lin in lins):
        return "a rank-r term (the factors stay per layer)"
    if not hasattr(lins[0].kernel, "decoder"):
        return f"layout {p0.layout!r} has no one-token product"
    return None


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def stack_packed(parts: list[PackedWeight]) -> PackedWeight:
    """One packed weight holding the rows of ``parts`` in order (same layout, format and d_in; rows are
    independent in every packed layout, so stacking codes, scales and zeros along rows is exact).  Scales and
    zeros of different dtypes are stacked in float32 (it holds float16 values exactly)."""
    p0 = parts[0]

    def cat(ts):
        dtype = ts[0].dtype if len({t.dtype for t in ts}) == 1 else torch.float32
        return torch.cat([_rows(t).to(dtype) for t in ts])

    d_out = sum(p.shape[0] for p in parts)
    return PackedWeight(p0.layout, p0.bits, p0.group_size, (d_out, p0.shape[1]), cat([p.qweight for p in parts]),
                        cat([p.scale for p in parts]), None if p0.zero is None else cat([p.zero for p in parts]), p0.fmt)


def row_views(packed: PackedWeight, parts: list[PackedWeight]) -> list[PackedWeight]:
    """``parts`` rebuilt as row views of ``packed`` (their stack, :func:`stack_packed`), in their own shapes."""
    out, r = [], 0
    for p in parts:
        n = p.shape[0]

        def view(stacked, own, r=r, n=n):
            return None if stacked is None else stacked[r:r + n].view(own.shape)

        out.append(PackedWeight(p.layout, p.bits, p.group_size, p.shape, view(packed.qweight, p.qweight),
                                view(packed.scale, p.scale), view(packed.zero, p.zero), p.fmt))
        r += n
    return out


def _stacked_in_place(parts: list[PackedWeight]) -> PackedWeight | None:
    """The stack ``parts`` already are row views of (consecutive rows of the same tensors: members re-packed
    in place into an earlier stack), or None."""
    names = ("qweight", "scale") + (("zero",) if parts[0].zero is not None else ())
    bases = []
    for name in names:
        ts = [getattr(p, name) for p in parts]
        base = ts[0]._base
        if base is None or any(t._base is not base for t in ts) or len({t.dtype for t in ts}) != 1:
            return None
        row = base.stride(0) * base.element_size()
        offset, ptr = 0, base.data_ptr()
        for t, p in zip(ts, parts):
            if t.data_ptr() != ptr + offset * row:
                return None
            offset += p.shape[0]
        if offset != base.shape[0]:
            return None
        bases.append(base)
    p0 = parts[0]
    d_out = sum(p.shape[0] for p in parts)
    return PackedWeight(p0.layout, p0.bits, p0.group_size, (d_out, p0.shape[1]), bases[0], bases[1],
                        bases[2] if len(bases) > 2 else None, p0.fmt)


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
        prompt = getattr(self.inner, "mode", None) == "prompt"
        if torch.compiler.is_compiling():  # a compiled decode step (ttq.compiled), the stack built by the prefill
            return self.group.traced(x, self.index) if prompt and self.group.linear is not None else self.inner(x)
        if prompt:
            y = self.group.output(x, self.index)
            if y is not None:
                return y
        y = self.inner(x)
        if prompt:
            self.group.sync()  # after the last member's prefill: stack this prompt's products
        return y


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


def drop_stacks(model: nn.Module) -> None:
    """Every fused group of ``model`` forgets its stacked product (``ttq.runtime.reset`` / ``set_mode`` call
    this: a compiled step never reads a stack of a previous prompt; the next prefill stacks again)."""
    for m in model.modules():
        if isinstance(m, SharedInputLinear):
            m.group.drop()


def unfuse(model: nn.Module) -> int:
    """Put the layers wrapped by :func:`fuse_shared_inputs` back; returns how many were unwrapped."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SharedInputLinear):
                setattr(parent, name, child.inner)
                n += 1
    return n
