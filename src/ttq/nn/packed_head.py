"""A statically quantized, packed output head (LM head) for fast decoding.

The TTQ paper quantizes the decoder blocks only; on a small model the full-precision
LM head then dominates a decode step (SmolLM2-135M: 28 M of its 135 M weights, read once
per generated token).  :class:`PackedHeadLinear` quantizes the head once with plain
round-to-nearest (no activation statistic: ``s = 1``) and binds it to its kernel once
(:func:`ttq.kernels.api.pack_linear`, as prompt mode does), like llama.cpp's quantized output tensor.  It is
opt-in (:func:`ttq.runtime.quantize_lm_head`) and changes the logits accordingly.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ttq.formats.affine import QuantSpec


class PackedHeadLinear(nn.Module):
    """RTN-quantized ``nn.Linear`` stored in a packed layout; ``.original`` keeps the linear.

    Args:
        linear: the head to quantize (its weight is not modified; a tied embedding keeps working).
        spec: bits and group size of the codes (any the kernels support; see ``layout``).
        layout: packed layout (None = best for the device; see :mod:`ttq.kernels.api`).
        half_params: float16 scale / zero (``cpu_q*`` layouts; 8-bit g = 32: 1.125 instead of 1.25 bytes per
            weight); None = the option ``half_params`` of :mod:`ttq.options`.
    """

    def __init__(self, linear: nn.Linear, spec: QuantSpec, layout: str | None = None,
                 half_params: bool | None = None) -> None:
        super().__init__()
        from ttq.kernels.api import pack_linear

        if spec.fmt != "int":
            raise ValueError(f"the packed head supports the integer format only, got fmt={spec.fmt!r}")
        self.original = linear
        self.spec = spec
        w = linear.weight.detach()
        self.register_buffer("ones", torch.ones(w.shape[1], dtype=torch.float32, device=w.device), persistent=False)
        self.linear = pack_linear(w, self.ones, spec, linear.bias, layout=layout, half_params=half_params)  # ttq.kernels.api.PackedLinear

    @property
    def packed(self):
        """The packed weight (:class:`ttq.kernels.api.PackedWeight`)."""
        return self.linear.packed

    @property
    def weight(self) -> torch.Tensor:  # generation utilities read the head's weight (dtype, device, tying)
        return self.original.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)  # (..., d_in) -> (..., vocab)

    def extra_repr(self) -> str:
        return f"{self.original.in_features}, {self.original.out_features}, bits={self.spec.bits}, " \
               f"group_size={self.spec.group_size}, layout={self.packed.layout}"
