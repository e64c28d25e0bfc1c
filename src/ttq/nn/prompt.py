"""Prompt mode of a TTQ layer as two explicit steps (TTQ paper, Section 2 eq. 3 and Appendix H).

Generation splits into a prefill (the prompt, many tokens) and decode steps (one new token per
sequence, with a KV cache), as in gpt-fast's ``prefill`` / ``decode_one_token``.  In prompt mode a
:class:`ttq.nn.linear.TTQLinear` holds one :class:`PromptState`, all its per-prompt state:

* :meth:`PromptState.prefill` ``(real)`` -- the statistic of the prompt's real tokens (a batch of
  prompts shares one ``s``) gives ``s``; ``(W - B A) diag(s)`` is packed once and its product bound
  to the kernel (:func:`ttq.kernels.api.pack_linear`: one crossing of the kernel layer);
  With refinements (:mod:`ttq.methods.refine`) the layer's ``refiner`` chooses the codes (and ``s``,
  the factors) from the prompt's statistics and they are packed as they are
  (:func:`ttq.kernels.api.pack_codes_linear`), so prompt mode and per-sequence mode agree on the same tokens;
* :meth:`PromptState.decode` ``(x)`` -- one token per sequence through the packed weights (the
  kernel's bound one-token product when it has one).  ``refresh_every = N`` adds each step's
  tokens to the running statistic and re-quantizes every N steps.

A model's ``forward`` does not say which step it is running, so :meth:`PromptState.__call__` (the
layer's forward in prompt mode) tells them apart by token count: more than one token per sequence,
or nothing packed yet, is a prefill; one token per sequence is a decode step.  ``model.generate``
therefore needs no extra call; a one-token prompt after another prompt looks like a decode step:
call :func:`ttq.runtime.reset` first.  Inside :func:`ttq.runtime.holding` every forward after the prefill,
whatever its length, runs on the packed weights (a continuation scored with the prompt's quantization); a layer
with nothing packed yet (an MoE expert no prompt token reached) packs from the first of its tokens, as it would
at its first decode step.  Set the mode of a whole model with :func:`ttq.runtime.set_mode`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ttq.formats.affine import QuantSpec
from ttq.kernels.api import PackedLinear, PackedWeight, pack_codes_linear, pack_linear
from ttq.methods.refine import Refined, RefineSpec, TokenStats
from ttq.methods.scaling import ChannelStats, ScaleSpec
from ttq.methods.ttq import ttq_scale
from ttq.patch.tokens import TokenMask, real_tokens

# (w_res, bias, b, a) of a layer: the weight to pack (W, or the residual W - B A) and the product's other
# arguments (low-rank factors contiguous float32, or None when r = 0)
Weights = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]
# (statistic for s, the refinements' token statistics) -> the layer's refined quantization
Refiner = Callable[[ChannelStats, TokenStats], Refined]


@dataclass(frozen=True)
class PromptOptions:
    """Options of the ``"prompt"`` runtime mode.

    Args:
        refresh_every: re-quantize after this many decode steps from the running statistic of
            the prompt and the generated tokens (0 = never).
        layout: packed layout for :func:`ttq.kernels.api.pack_ttq` (None = best for the device).
        strict: raise instead of falling back to the reference path when no kernel fits.
        reference: decode with the plain dequantize-then-matmul oracle on the same packed weights.
        half_params: float16 scale / zero (CPU layouts; fewer bytes per decode step,
            scale and zero rounded to float16); None = the option ``half_params`` of :mod:`ttq.options`
            (``TTQ_HALF_PARAMS`` at start-up; off).
    """

    refresh_every: int = 0
    layout: str | None = None
    strict: bool = False
    reference: bool = False
    half_params: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.refresh_every, bool) or not isinstance(self.refresh_every, int) or self.refresh_every < 0:
            raise ValueError(f"refresh_every must be a non-negative integer (0 = never), got {self.refresh_every!r}")
        if self.half_params is not None and not isinstance(self.half_params, bool):
            raise ValueError(f"half_params must be True, False or None, got {self.half_params!r}")


class PromptState:
    """Per-prompt runtime state of one TTQ layer: the packed product and the refresh counters.

    Args:
        weights: returns the layer's ``(w_res, bias, b, a)`` (see :data:`Weights`); called at each
            quantization, so a cached residual or a moved layer is picked up.
        spec, scale: the layer's format and statistic.
        options: :class:`PromptOptions`.
        refine, refiner: the layer's refinements and the function that applies them (both None: plain TTQ).

    State (all of it; :meth:`reset` clears it):
        linear: the current prompt's :class:`ttq.kernels.api.PackedLinear` (None before the first prefill).
        stats: running statistic of the prompt and the decoded tokens (``refresh_every > 0`` only).
        tokens: the same for the refinements' :class:`ttq.methods.refine.TokenStats` (with a refiner).
        alpha: the alpha the current prompt's ``s`` was computed with (a refiner's choice; None without one;
            the refined codes themselves live only in the packed weight).
        steps: decode steps since the last quantization.
        n_quantizations, seconds: quantizations and their wall time since the last reset.
    """

    # per-prompt state, which ttq.compiled.state_key leaves out: the attributes :meth:`reset` sets, and ``reuse``
    PER_PROMPT = ("linear", "stats", "tokens", "alpha", "steps", "n_quantizations", "seconds", "reuse")

    def __init__(self, weights: Callable[[], Weights], spec: QuantSpec, scale: ScaleSpec,
                 options: PromptOptions | None = None, refine: RefineSpec | None = None,
                 refiner: Refiner | None = None) -> None:
        if (refine is None) != (refiner is None):
            raise ValueError("refine and refiner come together: give both or neither")
        self.weights, self.spec, self.scale = weights, spec, scale
        self.refine, self.refiner = refine, refiner
        self.options = options or PromptOptions()
        # a packed weight of this layer's shape and format that a new prompt may be packed into when none is held
        # (a fused group's row view of its stack, ttq.nn.fused: its members then pack into the stack in place)
        self.reuse: PackedWeight | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the prompt (the next forward is a prefill) and zero the counters."""
        self.linear: PackedLinear | None = None
        self.stats: ChannelStats | None = None
        self.tokens: TokenStats | None = None
        self.alpha: float | None = None
        self.hold = False  # True: forwards of any length run on the packed weights (ttq.runtime.holding)
        self.steps = 0
        self.n_quantizations = 0
        self.seconds = 0.0

    @property
    def packed(self) -> PackedWeight | None:
        """The current prompt's packed weight, or None."""
        return self.linear.packed if self.linear is not None else None

    @property
    def s(self) -> torch.Tensor | None:
        """The current prompt's scale ``s`` (d_in,) float32, or None."""
        return self.linear.s if self.linear is not None else None

    def __call__(self, x: torch.Tensor, mask: TokenMask | None = None) -> torch.Tensor:
        """The layer's forward in prompt mode: :meth:`decode` for one token per sequence once a prompt is
        packed, else :meth:`prefill` from ``x``'s real tokens (``mask`` leaves pads out) and the packed product."""
        lin = self.linear
        if torch.compiler.is_compiling():  # the compiled decode step (ttq.compiled): packed by the eager prefill
            return lin(x)
        if lin is not None:
            if lin.decoder is not None:  # bound only without refresh, where it is all decode() does: call it
                y = lin.decoder(x)  # directly (the per-token hot path); None for prefill-shaped x
                if y is not None:
                    return y
            if x.dim() < 2 or x.shape[-2] == 1 or self.hold:  # (B, 1, d), (1, d), (d,); held: any length
                return self.decode(x, mask)
        real = x if mask is None else real_tokens(x, mask.rows(x))
        if self.hold:  # first reached inside a held continuation (an MoE expert no prompt token was routed to):
            real = real.reshape(-1, real.shape[-1])[:1]  # its first token, as at its first decode step in generation
        self.prefill(real)
        return self.linear(x)

    def prefill(self, real: torch.Tensor) -> None:
        """Quantize for a new prompt from its real tokens ``real`` (..., d_in; every leading dim is a token)."""
        stats = ChannelStats.from_activations(real, self.scale.p)
        tokens = TokenStats.from_activations(real, self.refine) if self.refine is not None else None
        keep = bool(self.options.refresh_every)
        self.stats, self.tokens = (stats, tokens) if keep else (None, None)
        self._quantize(stats, tokens)

    def decode(self, x: torch.Tensor, mask: TokenMask | None = None) -> torch.Tensor:
        """One decode step: ``x`` (..., d_in) -> (..., d_out) from the packed weights.  With ``refresh_every``
        the step's real tokens join the running statistic, which re-quantizes every ``refresh_every`` steps."""
        if self.linear is None:
            raise RuntimeError("decode step before any prefill: no prompt is packed")
        refresh = self.options.refresh_every
        if refresh:  # no bound decoder then: every step passes here
            real = x if mask is None else real_tokens(x, mask.rows(x))
            self.stats = self.stats.merge(ChannelStats.from_activations(real, self.scale.p))
            if self.refine is not None:
                self.tokens = self.tokens.merge(TokenStats.from_activations(real, self.refine), self.refine)
            self.steps += 1
            if self.steps >= refresh:
                self._quantize(self.stats, self.tokens)
        return self.linear(x)

    def _quantize(self, stats: ChannelStats, tokens: TokenStats | None = None) -> None:
        """Pack ``(W - B A) diag(s)`` for the statistic ``stats`` and bind its product (with a refiner: the
        codes it chooses from ``stats`` and ``tokens``, packed as they are)."""
        t0 = time.perf_counter()
        w_res, bias, b, a = self.weights()
        o = self.options
        if self.refiner is not None:
            q = self.refiner(stats, tokens)
            self.alpha = q.alpha
            if q.b is not None:  # the product adds the factors back (prompt-aware ones included)
                b, a = q.b.contiguous(), q.a.contiguous()
            self.linear = pack_codes_linear(q.codes, q.scale, q.zero, q.s, self.spec, bias, b, a, layout=o.layout,
                                            strict=o.strict, half_params=o.half_params,
                                            decoder=not o.refresh_every, reference=o.reference)
        else:
            s = ttq_scale(stats, self.scale)  # (d_in,)
            self.linear = pack_linear(w_res, s, self.spec, bias, b, a, layout=o.layout, strict=o.strict,
                                      out=self.packed if self.linear is not None else self.reuse,
                                      half_params=o.half_params, decoder=not o.refresh_every,
                                      reference=o.reference)
        self.steps = 0
        self.n_quantizations += 1
        self.seconds += time.perf_counter() - t0
