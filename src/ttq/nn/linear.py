"""Quantized linear modules that replace ``nn.Linear`` in decoder blocks.

* :class:`StaticQuantLinear` -- RTN / AWQ (and any method that produces codes
  once): stores codes, scales, zeros and an optional input scale ``s``; the
  reference forward is ``F.linear(x / s, dequant(codes))``.
* :class:`TTQLinear` -- keeps the full-precision weight and quantizes it at
  test time, in one of two runtime modes (:data:`MODES`):

  - ``"per_sequence"`` (default; the paper's evaluation): every forward
    computes ``s`` from its own tokens, one quantization per sequence of the batch;
  - ``"prompt"`` (generation, TTQ paper Section 2 eq. 3 and Appendix H): a
    forward with more than one token per sequence (the prefill) computes ``s``
    from all its tokens -- a batch of prompts shares one ``s`` -- and packs
    ``(W - B A) diag(s)`` once (:func:`ttq.kernels.api.pack_ttq`); one-token
    forwards (decode steps with a KV cache) reuse the packed weights through
    :func:`ttq.kernels.api.packed_linear`.  The next prefill re-quantizes.
    ``refresh_every = N`` re-quantizes every N decode steps from the running
    statistic of the prompt and the generated tokens.  Set it on a whole model
    with :func:`ttq.runtime.set_mode`.

Both keep the original ``nn.Linear`` reachable (``.original``) so that
:func:`ttq.patch.restore_` can put it back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ttq.formats.affine import QuantSpec, dequantize
from ttq.methods.lowrank import residual, svd_factors
from ttq.methods.scaling import ChannelStats, ScaleSpec, input_scale, scaled_quantize
from ttq.patch.tokens import TokenMask, real_tokens

MODES = ("per_sequence", "prompt")


@dataclass(frozen=True)
class PromptOptions:
    """Options of the ``"prompt"`` runtime mode.

    Args:
        refresh_every: re-quantize after this many decode steps from the running statistic of
            the prompt and the generated tokens (0 = never).
        layout: packed layout for :func:`ttq.kernels.api.pack_ttq` (None = best for the device).
        strict: raise instead of falling back to the reference path when no kernel fits.
        reference: decode with the plain dequantize-then-matmul oracle on the same packed weights.
        half_params: float16 scale / zero for bits <= 4 (CPU layouts; fewer bytes per decode step,
            scale and zero rounded to float16); None = the ``TTQ_HALF_PARAMS`` environment default (off).
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


def per_sequence(fn, x: torch.Tensor, mask: TokenMask | None = None) -> torch.Tensor:
    """``fn(x_i, real_i)`` for each sequence of a (B, T, d) batch separately (each gets its own
    activation statistic, taken over ``real_i``: its real tokens, pad positions left out when
    ``mask`` marks them); any other input goes through ``fn`` whole."""
    keep = mask.rows(x) if mask is not None else None  # (B, T) bool or None (every token real)
    if x.dim() == 3 and x.shape[0] > 1:
        return torch.cat([fn(xi[None], real_tokens(xi, None if keep is None else keep[i])) for i, xi in enumerate(x)],
                         dim=0)  # B x (1, T, d_out) -> (B, T, d_out)
    return fn(x, real_tokens(x, keep))


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
    returns ``x W_q^T + (x A^T) B^T + bias``.  ``mode`` (see the module
    docstring): ``"per_sequence"`` quantizes every forward, one quantization per
    sequence of a batch; ``"prompt"`` quantizes at each prefill and decodes from
    packed weights.  Inference only (the packed path has no gradient).
    """

    def __init__(
        self,
        original: nn.Linear,
        spec: QuantSpec,
        scale: ScaleSpec,
        rank: int = 0,
        mode: str = "per_sequence",
        options: PromptOptions | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = original.in_features, original.out_features
        self.spec, self.scale_spec, self.rank = spec, scale, rank
        self.weight = original.weight  # full precision, kept by design
        self.bias = original.bias
        self.original = original
        b, a = svd_factors(original.weight.detach(), rank)
        self.register_buffer("lr_b", b.to(original.weight.dtype))  # (d_out, r)
        self.register_buffer("lr_a", a.to(original.weight.dtype))  # (r, d_in)
        self._residual: torch.Tensor | None = None
        self._lr_f32: tuple[torch.Tensor, torch.Tensor] | None = None  # contiguous float32 (B, A) for kernels
        self.set_mode(mode, options)

    def residual_weight(self) -> torch.Tensor:
        """``W - B A`` (float32), computed once."""
        if self._residual is None:
            self._residual = residual(self.weight.detach(), self.lr_b.float(), self.lr_a.float())
        return self._residual

    def quantize_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes, scale, zero of ``(W - B A) diag(s)`` and ``s`` (d_in,) for activations ``x``."""
        s = input_scale(ChannelStats.from_activations(x, self.scale_spec.p), self.scale_spec)
        codes, scale, zero = scaled_quantize(self.residual_weight(), s, self.spec)
        return codes, scale, zero, s

    token_mask: TokenMask | None = None  # set by quantize_: pad tokens stay out of the statistic

    def _forward_one(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        codes, scale, zero, s = self.quantize_for(real)
        w_q = dequantize(codes, scale, zero, self.spec.group_size, fmt=self.spec.fmt).to(x.dtype)  # (d_out, d_in)
        y = F.linear(x / s.to(x.dtype), w_q, self.bias)
        if self.rank:
            y = y + F.linear(F.linear(x, self.lr_a.to(x.dtype)), self.lr_b.to(x.dtype))
        return y

    # ------------------------------------------------------------------ runtime modes
    def set_mode(self, mode: str, options: PromptOptions | None = None) -> None:
        """Switch runtime mode (drops any packed state)."""
        if mode not in MODES:
            raise ValueError(f"unknown TTQ runtime mode {mode!r}; allowed: {', '.join(MODES)}")
        self.mode, self.options = mode, options or PromptOptions()
        self.reset()

    def reset(self) -> None:
        """Forget the prompt's packed weights and statistics (the next forward re-quantizes)."""
        self.packed = None  # ttq.kernels.api.PackedWeight of the current prompt
        self.prompt_scale: torch.Tensor | None = None  # s (d_in,) float32 of the current prompt
        self._stats: ChannelStats | None = None  # running statistic (refresh_every > 0)
        self._steps = 0  # decode steps since the last quantization
        self._kernel = None  # the packed layout's kernel (ttq.kernels.api.get_kernel)
        self._decode = None  # the kernel's bound decode product (its optional ``decoder``): x -> y, or None
        self._ref_weight = None  # reference=True: deq(packed) (float32), dequantized once per quantization
        self.quant_seconds = 0.0  # wall time spent quantizing in prompt mode since reset
        self.n_quantizations = 0

    def _lowrank(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.rank:
            return None, None
        if self._lr_f32 is None:
            self._lr_f32 = (self.lr_b.float().contiguous(), self.lr_a.float().contiguous())  # (d_out, r), (r, d_in)
        return self._lr_f32

    def quantize_prompt(self, stats: ChannelStats) -> None:
        """Pack ``(W - B A) diag(s)`` for the statistic ``stats`` (prompt mode)."""
        from ttq.kernels.api import get_kernel, pack_ttq

        t0 = time.perf_counter()
        s = input_scale(stats, self.scale_spec)  # (d_in,)
        w = self.residual_weight() if self.rank else self.weight.detach()
        o = self.options
        self.packed = pack_ttq(w, s, self.spec, layout=o.layout, strict=o.strict, out=self.packed,
                               half_params=o.half_params)
        self.prompt_scale = s
        self._kernel = get_kernel(self.packed.layout, self.packed.device.type)  # decode calls it directly
        self._decode = self._bind_decode()
        if o.reference:
            from ttq.kernels.reference import dequantize_packed

            self._ref_weight = dequantize_packed(self.packed)
        self._steps = 0
        self.n_quantizations += 1
        self.quant_seconds += time.perf_counter() - t0

    def _bind_decode(self):
        """The kernel's decode product bound to this layer's packed weights (None when it has none)."""
        o = self.options
        bind = None if o.reference or o.refresh_every else getattr(self._kernel, "decoder", None)
        return bind(self.packed, self.prompt_scale, self.bias, *self._lowrank()) if bind is not None else None

    def __getstate__(self):
        # the bound product holds references to this instance's tensors: copies and pickles rebind to theirs
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state["_decode"] = None
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        if self.mode == "prompt" and self.packed is not None and self._kernel is not None:
            self._decode = self._bind_decode()

    def _forward_prompt(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[-2] if x.dim() >= 2 else 1  # per sequence: (B, T, d) -> T, (T, d) -> T
        refresh = self.options.refresh_every
        real = x if self.token_mask is None else real_tokens(x, self.token_mask.rows(x))  # pads left out
        if tokens > 1 or self.packed is None:  # a prefill (or a first forward): quantize from it
            stats = ChannelStats.from_activations(real, self.scale_spec.p)  # all sequences share s
            self._stats = stats if refresh else None
            self.quantize_prompt(stats)
        elif refresh:
            self._stats = self._stats.merge(ChannelStats.from_activations(real, self.scale_spec.p))
            self._steps += 1
            if self._steps >= refresh:
                self.quantize_prompt(self._stats)
        b, a = self._lowrank()
        if self.options.reference:
            from ttq.kernels.reference import reference_linear

            return reference_linear(x, self.packed, self.prompt_scale, self.bias, b, a, weight=self._ref_weight)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the layer expects {self.in_features}")
        return self._kernel.linear(x, self.packed, self.prompt_scale, self.bias, b, a)  # shapes known: skip api checks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "prompt":
            if self._decode is not None:  # decode steps: the bound kernel (None for a prefill-shaped x)
                y = self._decode(x)
                if y is not None:
                    return y
            return self._forward_prompt(x)
        return per_sequence(self._forward_one, x, self.token_mask)

    def extra_repr(self) -> str:
        s, c = self.spec, self.scale_spec
        return (
            f"in={self.in_features}, out={self.out_features}, bits={s.bits}, group_size={s.group_size}, "
            f"rank={self.rank}, alpha={c.alpha}, lam={c.lam}, p={c.p}, form={c.form}, mode={self.mode}"
        )
