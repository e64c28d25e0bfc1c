"""Quantized linear modules that replace ``nn.Linear`` in decoder blocks.

* :class:`StaticQuantLinear` -- RTN / AWQ (and any method that produces codes
  once): stores codes, scales, zeros and an optional input scale ``s``; the
  reference forward is ``F.linear(x / s, dequant(codes))``.
* :class:`TTQLinear` -- keeps the full-precision weight and quantizes it at
  test time, in one of two runtime modes (:data:`MODES`):

  - ``"per_sequence"`` (default; the paper's evaluation): every forward
    computes ``s`` from its own tokens, one quantization per sequence of the batch;
  - ``"prompt"`` (generation, TTQ paper Section 2 eq. 3 and Appendix H): the
    layer's :class:`ttq.nn.prompt.PromptState` runs a prefill (more than one
    token per sequence: ``s`` from all its real tokens -- a batch of prompts
    shares one ``s`` -- and ``(W - B A) diag(s)`` packed once) or a decode step
    (one token per sequence, with a KV cache: the packed weights).  The next
    prefill re-quantizes; ``refresh_every = N`` re-quantizes every N decode
    steps from the running statistic of the prompt and the generated tokens.
    Set it on a whole model with :func:`ttq.runtime.set_mode`.

The TTQ math itself is :func:`ttq.methods.ttq.ttq_linear`; with on-the-fly refinements
(``refine``, :class:`ttq.methods.refine.RefineSpec`) each sequence's (prompt's) codes come from
:func:`ttq.methods.refine.refine_quantize` and run through :func:`ttq.methods.ttq.codes_linear`
(prompt mode packs them with :func:`ttq.kernels.api.pack_codes_linear`).  The weight is checked for
NaN/Inf once, when the layer wraps it, and again only after it changes in place
(:class:`WeightWatch`), not at every forward.  Both layers keep the original
``nn.Linear`` reachable (``.original``) so that :func:`ttq.patch.restore_` can put it back.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ttq.formats.affine import QuantSpec, check_finite, dequantize
from ttq.methods.lowrank import residual, svd_factors
from ttq.methods.refine import Refined, RefineSpec, TokenStats, refine_quantize
from ttq.methods.scaling import ChannelStats, ScaleSpec
from ttq.methods.ttq import codes_linear, ttq_linear, ttq_quantize, ttq_scale
from ttq.nn.prompt import PromptOptions, PromptState, Weights  # PromptOptions is re-exported here too
from ttq.patch.tokens import TokenMask, real_tokens

MODES = ("per_sequence", "prompt")


def per_sequence(fn, x: torch.Tensor, mask: TokenMask | None = None) -> torch.Tensor:
    """``fn(x_i, real_i)`` for each sequence of a (B, T, d) batch separately (each gets its own
    activation statistic, taken over ``real_i``: its real tokens, pad positions left out when
    ``mask`` marks them); any other input goes through ``fn`` whole."""
    keep = mask.rows(x) if mask is not None else None  # (B, T) bool or None (every token real)
    if x.dim() == 3 and x.shape[0] > 1:
        return torch.cat([fn(xi[None], real_tokens(xi, None if keep is None else keep[i])) for i, xi in enumerate(x)],
                         dim=0)  # B x (1, T, d_out) -> (B, T, d_out)
    return fn(x, real_tokens(x, keep))


class WeightWatch:
    """NaN/Inf check of a test-time layer's full-precision weight: when the layer wraps it, then only
    after it changes (its version counter or its storage: an in-place update, a device move; an
    inference-mode tensor has no version counter, so only its storage counts).  The per-forward
    quantization then skips the check (``check=False``): a finite weight times the finite scale ``s``
    stays finite short of float32 overflow (|W| s > 3.4e38)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self._key: tuple[int, int] | None = None
        self.changed(weight)

    def changed(self, weight: torch.Tensor) -> bool:
        """Check ``weight`` (d_out, d_in) if it changed since the last call; True when it had (or on the
        first call), so that the caller refreshes what it derives from it.  Raises ValueError naming the
        weight's shape when it holds NaN/Inf."""
        key = (-1 if weight.is_inference() else weight._version, weight.data_ptr())
        if key == self._key:
            return False
        check_finite(weight.detach(), f"the weight of shape {tuple(weight.shape)} of a TTQ layer")
        self._key = key
        return True


class DequantCachedLinear(nn.Module):
    """Base of static quantized layers: the effective weight (``_dequantize()``, subclass hook) is
    computed once, in the layer dtype, and dropped whenever the module moves (``.to``/``.cuda``)."""

    _w_cache: torch.Tensor | None = None

    def _dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """Effective weight (d_out, d_in) in the layer dtype, on the codes' device."""
        if self._w_cache is None:
            self._w_cache = self._dequantize().to(self._dtype)
        return self._w_cache

    def _apply(self, fn, recurse=True):  # device/dtype moves invalidate the cached weight
        self._w_cache = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)


class StaticQuantLinear(DequantCachedLinear):
    """A linear layer with weights quantized once (codes, scale, zero; optional input scale)."""

    def __init__(
        self,
        original: nn.Linear,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        spec: QuantSpec,
        input_scale: torch.Tensor | None = None,
        keep_original: bool = True,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = original.in_features, original.out_features
        self.spec = spec
        self.register_buffer("codes", codes)  # (d_out, d_in) uint8
        self.register_buffer("scale", scale)  # (d_out, n_groups) float32
        self.register_buffer("zero", zero)  # (d_out, n_groups) float32
        self.register_buffer("input_scale", input_scale)  # (d_in,) or None
        self.bias = original.bias
        self._dtype = original.weight.dtype
        self.original = original if keep_original else None

    def _dequantize(self) -> torch.Tensor:
        """``dequant(codes) diag(s)^-1`` (d_out, d_in) float32."""
        w = dequantize(self.codes, self.scale, self.zero, self.spec.group_size, fmt=self.spec.fmt)
        return w / self.input_scale if self.input_scale is not None else w

    def extra_repr(self) -> str:
        s = self.spec
        return f"in={self.in_features}, out={self.out_features}, bits={s.bits}, group_size={s.group_size}, awq={self.input_scale is not None}"


class TTQLinear(nn.Module):
    """Test-time quantized linear layer (TTQ paper, Section 2).

    Quantizes ``W - B A`` scaled by ``s`` (computed from the activations) and
    returns ``x W_q^T + (x A^T) B^T + bias`` (:func:`ttq.methods.ttq.ttq_linear`).
    ``mode`` (see the module docstring): ``"per_sequence"`` quantizes every
    forward, one quantization per sequence of a batch; ``"prompt"`` runs the
    prefill / decode steps of :attr:`prompt` (a :class:`ttq.nn.prompt.PromptState`).
    Inference only (the packed path has no gradient).
    """

    def __init__(
        self,
        original: nn.Linear,
        spec: QuantSpec,
        scale: ScaleSpec,
        rank: int = 0,
        mode: str = "per_sequence",
        options: PromptOptions | None = None,
        refine: RefineSpec | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = original.in_features, original.out_features
        self.spec, self.scale_spec, self.rank = spec, scale, rank
        self.refine = refine  # on-the-fly refinements (None: plain TTQ)
        self.weight = original.weight  # full precision, kept by design
        self.bias = original.bias
        self.original = original
        self._watch = WeightWatch(original.weight)  # NaN/Inf: checked here, then only after a change
        b, a = svd_factors(original.weight.detach(), rank)
        self.register_buffer("lr_b", b.to(original.weight.dtype))  # (d_out, r)
        self.register_buffer("lr_a", a.to(original.weight.dtype))  # (r, d_in)
        self._residual: torch.Tensor | None = None
        self._lr_f32: tuple[torch.Tensor, torch.Tensor] | None = None  # contiguous float32 (B, A) for kernels
        self.set_mode(mode, options)

    def residual_weight(self) -> torch.Tensor:
        """``W - B A`` (float32), computed once (again after the weight changes)."""
        if self._watch.changed(self.weight) or self._residual is None:
            self._residual = residual(self.weight.detach(), self.lr_b.float(), self.lr_a.float())
        return self._residual

    def quantize_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes, scale, zero of ``(W - B A) diag(s)`` and ``s`` (d_in,) for activations ``x``."""
        s = ttq_scale(x, self.scale_spec)
        codes, scale, zero = ttq_quantize(self.residual_weight(), s, self.spec, check=False)
        return codes, scale, zero, s

    token_mask: TokenMask | None = None  # set by quantize_: pad tokens stay out of the statistic

    def refine_for(self, stats: ChannelStats, tokens: TokenStats) -> Refined:
        """The refined quantization (:func:`ttq.methods.refine.refine_quantize`) for one sequence's statistics."""
        b, a = (self.lr_b.float(), self.lr_a.float()) if self.rank else (None, None)
        return refine_quantize(self.weight.detach(), stats, tokens, self.spec, self.scale_spec, self.refine, b, a,
                               w_res=self.residual_weight())

    def _forward_one(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        if self.refine is not None:
            q = self.refine_for(ChannelStats.from_activations(real, self.scale_spec.p),
                                TokenStats.from_activations(real, self.refine))
            return codes_linear(x, q.codes, q.scale, q.zero, q.s, self.spec, q.b, q.a, self.bias)
        s = ttq_scale(real, self.scale_spec)  # (d_in,) from this sequence's real tokens
        return ttq_linear(x, self.residual_weight(), self.lr_b, self.lr_a, s, self.spec, self.bias, check=False)

    # ------------------------------------------------------------------ runtime modes
    def set_mode(self, mode: str, options: PromptOptions | None = None) -> None:
        """Switch runtime mode (drops any packed state)."""
        if mode not in MODES:
            raise ValueError(f"unknown TTQ runtime mode {mode!r}; allowed: {', '.join(MODES)}")
        self.mode = mode
        refiner = self.refine_for if self.refine is not None else None
        self.prompt = PromptState(self._prompt_weights, self.spec, self.scale_spec, options, self.refine, refiner)

    def reset(self) -> None:
        """Forget the prompt's packed weights and statistics (the next forward re-quantizes)."""
        self.prompt.reset()

    def _prompt_weights(self) -> Weights:
        """What prompt mode packs and binds: ``W`` (r = 0; in its own dtype, the kernels read it) or the
        cached residual ``W - B A``, the bias, and contiguous float32 factors (None when r = 0)."""
        if not self.rank:
            return self.weight.detach(), self.bias, None, None
        if self._lr_f32 is None:
            self._lr_f32 = (self.lr_b.float().contiguous(), self.lr_a.float().contiguous())  # (d_out, r), (r, d_in)
        return self.residual_weight(), self.bias, *self._lr_f32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "prompt":
            return self.prompt(x, self.token_mask)  # prefill or decode step (PromptState.__call__)
        return per_sequence(self._forward_one, x, self.token_mask)

    def extra_repr(self) -> str:
        s, c = self.spec, self.scale_spec
        return (
            f"in={self.in_features}, out={self.out_features}, bits={s.bits}, group_size={s.group_size}, "
            f"rank={self.rank}, alpha={c.alpha}, lam={c.lam}, p={c.p}, form={c.form}, mode={self.mode}"
            + (f", refine={self.refine}" if self.refine is not None else "")
        )
