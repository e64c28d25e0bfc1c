"""Fused mixture-of-experts tensors as one linear layer per expert.

transformers v5 stores the routed experts of an MoE block as 3-D parameters of one ``...Experts``
module (``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``; GPT-OSS transposed, with biases).  Its
class decorator ``@use_experts_implementation`` writes the layout on every instance: ``has_gate``
(``gate_up_proj`` or a plain ``up_proj``), ``has_bias`` (``<name>_bias (E, d_out)``),
``is_transposed`` (``(E, d_in, d_out)``), ``has_post_expert_norm``, plus ``_apply_gate`` and
``act_fn``.  That layout is the data this module reads: no family is named here.

:func:`unfuse_` replaces each such module by a :class:`RoutedExperts` whose experts are ordinary
``nn.Linear`` layers, views of the 3-D slices (no copy), named ``<experts>.gate_up_proj.<e>`` and
``<experts>.down_proj.<e>``.  Every linear method then applies to an expert exactly as to any other
linear, and the routing decides what each expert sees:

* calibration hooks (AWQ, GPTQ, ...) capture the tokens the router sends to that expert;
* a test-time method (TTQ, ...) takes its statistic over the tokens routed to expert ``e`` in the
  current forward: per sequence in ``"per_sequence"`` mode (pads left out), over the whole prompt's
  routed tokens in ``"prompt"`` mode, whose decode steps run only the routed experts' packed weights;
* an expert that receives no token is not run: its output is zero and nothing is quantized for it.
  In prompt mode an expert that got no prompt token is quantized at its first routed decode token(s),
  from their statistic.

:func:`refuse_` (and :func:`ttq.patch.restore_`) puts the original fused module back: its tensors
were never changed.  Router gates are not experts and stay as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from ttq.patch.tokens import TokenMask

logger = logging.getLogger(__name__)

# the instance attributes transformers' @use_experts_implementation sets: the layout
LAYOUT_FLAGS = ("has_gate", "has_bias", "is_transposed")


@dataclass(frozen=True)
class ExpertLayout:
    """How a fused experts module stores its weights (read from the module's own flags)."""

    has_gate: bool  # gate_up_proj (E, 2I, H) then _apply_gate; else up_proj (E, I, H) then act_fn
    has_bias: bool  # <name>_bias (E, d_out)
    transposed: bool  # (E, d_in, d_out) instead of (E, d_out, d_in)
    post_norm: bool  # a post_expert_norm module after the down projection

    @property
    def projections(self) -> tuple[str, str]:
        return ("gate_up_proj" if self.has_gate else "up_proj", "down_proj")


def layout_of(module: nn.Module) -> ExpertLayout | None:
    """The layout of a fused experts module, or None when it does not state one (an unknown layout)."""
    if not all(isinstance(getattr(module, f, None), bool) for f in LAYOUT_FLAGS):
        return None
    lay = ExpertLayout(module.has_gate, module.has_bias, module.is_transposed,
                       bool(getattr(module, "has_post_expert_norm", False)))
    for p in lay.projections:
        w = module._parameters.get(p)
        if w is None or w.dim() != 3 or (lay.has_bias and module._parameters.get(f"{p}_bias") is None):
            return None
    return lay


def is_fused(module: nn.Module) -> bool:
    """A module holding 3-D expert tensors (``gate_up_proj`` / ``up_proj`` / ``down_proj``)."""
    return any(p is not None and p.dim() == 3 for n, p in module._parameters.items()
               if n in ("gate_up_proj", "up_proj", "down_proj", "gate_proj"))


class ExpertLinear(nn.Linear):
    """An ``nn.Linear`` view of expert ``index``'s slice of a 3-D expert tensor (no copy)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, index: int) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.expert = index


class RoutedExperts(nn.Module):
    """A fused experts module run as one linear layer per expert (module docstring).

    ``forward(hidden (N, H), top_k_index (N, k), top_k_weights (N, k)) -> (N, H)`` as transformers'
    experts: each hit expert runs on its routed tokens, weighted by its routing weight, summed per token.
    """

    token_mask: TokenMask | None = None  # the model's real-token mask, set by quantize_

    def __init__(self, fused: nn.Module, layout: ExpertLayout) -> None:
        super().__init__()
        object.__setattr__(self, "fused", fused)  # not a submodule: the state dict holds the expert views
        self.layout = layout
        self.num_experts = fused._parameters[layout.projections[1]].shape[0]
        for name in layout.projections:
            w = fused._parameters[name].detach()  # (E, d_out, d_in), or (E, d_in, d_out) transposed
            b = fused._parameters[f"{name}_bias"].detach() if layout.has_bias else None  # (E, d_out)
            setattr(self, name, nn.ModuleList(
                ExpertLinear(w[e].t() if layout.transposed else w[e], None if b is None else b[e], e)
                for e in range(self.num_experts)))
        if layout.post_norm:
            self.post_expert_norm = fused.post_expert_norm
        self._inner = TokenMask()  # which of an expert's tokens are real, for its test-time layers
        self._shape: tuple[int, int] | None = None  # (B, T) of the MoE block's current input
        self._hook = None

    # ------------------------------------------------------------------ one expert
    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        f = self.fused
        return f._apply_gate(h) if self.layout.has_gate else f.act_fn(h)

    def _mlp(self, e: int, x: torch.Tensor) -> torch.Tensor:
        first, down = (getattr(self, n)[e] for n in self.layout.projections)
        y = down(self._activate(first(x)))
        return self.post_expert_norm(y) if self.layout.post_norm else y

    def _test_time(self, e: int) -> list[nn.Module]:
        return [m for m in (getattr(self, n)[e] for n in self.layout.projections) if hasattr(m, "token_mask")]

    def _run(self, e: int, x: torch.Tensor, tok: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Expert ``e`` on its routed tokens ``x`` (n, H) at flat positions ``tok`` (n,) -> (n, H)."""
        live = self._test_time(e)
        if not live:
            return self._mlp(e, x)
        for m in live:
            m.token_mask = self._inner
        b, t = self._shape or (1, x.shape[0])
        prompt = any(getattr(m, "mode", None) == "prompt" for m in live)
        if prompt:
            if t == 1:  # a decode step: one token per sequence, (n, 1, H)
                self._inner.mask = None if keep is None else keep[:, None]
                return self._mlp(e, x[:, None])[:, 0]
            self._inner.mask = None if keep is None else keep[None]  # a prefill: the prompt's routed tokens
            return self._mlp(e, x[None])[0]
        seq = tok // t  # per sequence: each gets the statistic of its own routed tokens
        out = torch.empty_like(x)
        for s in torch.unique(seq).tolist():
            rows = (seq == s).nonzero().squeeze(1)
            self._inner.mask = None if keep is None else keep[rows][None]
            out[rows] = self._mlp(e, x[rows][None])[0].to(out.dtype)
        return out

    def _keep(self, n: int) -> torch.Tensor | None:
        """(N,) real-token flags of the flat input, or None (every token real / no mask)."""
        mask = None if self.token_mask is None else self.token_mask.mask
        if mask is None or self._shape is None:
            return None
        b, t = self._shape
        if b * t != n or mask.shape[0] != b or mask.shape[1] < t:
            return None
        return mask[:, mask.shape[1] - t:].reshape(-1)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)  # (N, H)
        keep = self._keep(hidden_states.shape[0])
        prefill = self._shape is not None and self._shape[1] > 1
        if prefill:  # a new prompt: no expert keeps the last prompt's packed weights (a held continuation, which
            for e in range(self.num_experts):  # runs on them, is not a new prompt: ttq.runtime.holding)
                for m in self._test_time(e):
                    if getattr(m, "mode", None) == "prompt" and not m.prompt.hold:
                        m.reset()
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < self.num_experts:  # expert-parallel sentinels
                continue
            tok, pos = torch.where(top_k_index == e)  # (n,), (n,): routed tokens, in token order
            y = self._run(e, hidden_states[tok], tok, None if keep is None else keep[tok])
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out

    def extra_repr(self) -> str:
        lay = self.layout
        return f"experts={self.num_experts}, {type(self.fused).__name__}, transposed={lay.transposed}, bias={lay.has_bias}"


def _record_shape(experts: RoutedExperts):
    def pre_hook(_module, args, kwargs):
        h = args[0] if args else kwargs.get("hidden_states")
        experts._shape = (h.shape[0], h.shape[1]) if isinstance(h, torch.Tensor) and h.dim() == 3 else None

    return pre_hook


def fused_experts(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every fused experts module under ``root`` (not yet unfused)."""
    for name, mod in root.named_modules():
        if not isinstance(mod, RoutedExperts) and is_fused(mod):
            yield name, mod


def unfuse_(model: nn.Module) -> list[str]:
    """Replace every fused experts module of the decoder blocks by a :class:`RoutedExperts`.

    Modules whose layout is unknown stay fused (:func:`ttq.quantize_` refuses to quantize them).
    Returns the names of the modules unfused by this call.
    """
    from ttq.patch.blocks import find_blocks, set_module

    prefix, blocks = find_blocks(model)
    done = []
    for name, mod in list(fused_experts(blocks)):
        layout = layout_of(mod)
        if layout is None:
            continue
        routed = RoutedExperts(mod, layout)
        full = f"{prefix}.{name}"
        parent = model.get_submodule(full.rpartition(".")[0])
        routed._hook = parent.register_forward_pre_hook(_record_shape(routed), with_kwargs=True)
        set_module(model, full, routed)
        done.append(full)
    if done:
        logger.info("unfused %d fused experts module(s) into per-expert linears", len(done))
    return done


def refuse(model: nn.Module, name: str) -> int:
    """Put back the fused module of the :class:`RoutedExperts` at ``name``; returns how many of its expert
    layers had been replaced (by a quantized module keeping ``.original``)."""
    from ttq.patch.blocks import set_module

    routed = model.get_submodule(name)
    n = sum(1 for m in routed.modules() if isinstance(getattr(m, "original", None), nn.Module))
    if routed._hook is not None:
        routed._hook.remove()
    set_module(model, name, routed.fused)
    return n


def routed_experts(model: nn.Module) -> Iterator[tuple[str, RoutedExperts]]:
    for name, mod in model.named_modules():
        if isinstance(mod, RoutedExperts):
            yield name, mod


@contextmanager
def unfused(model: nn.Module) -> Iterator[None]:
    """Experts as per-expert linears inside the block (e.g. for calibration hooks); the modules this
    context unfused are fused again on exit."""
    names = unfuse_(model)
    try:
        yield
    finally:
        for name in names:
            refuse(model, name)
