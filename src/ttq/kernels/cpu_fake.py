"""Fake (meta) implementations of the ``torch.ops.ttq_cpu`` products, for ``torch.compile``.

The compiled decode step (:mod:`ttq.compiled`) traces a model whose packed layers call
``torch.ops.ttq_cpu.packed_mm`` / ``packed_mm_q4i8`` / ``packed_mm_q8i8``, ``dequant`` and ``decode_attention``.  Tracing
runs on fake tensors, so each op needs a function that returns an empty result of the right shape,
dtype and device without reading data; with them the graph does not break at the products and
Inductor calls the compiled kernels as external ops.  Registered once, when the extension loads
(:func:`ttq.kernels.cpu_build.load`).
"""

from __future__ import annotations

import torch

_done: list[bool] = []


def _product(x, s, qweight, scale, zero, *rest):
    d_out = rest[-5]  # (..., group, d_out, d_in, bias, b, a): d_out is the 5th value from the end
    return x.new_empty(x.shape[0], d_out)


def _dequant(qweight, scale, zero, bits, group, d_out, d_in, as_bf16):
    return qweight.new_empty(d_out, d_in, dtype=torch.bfloat16 if as_bf16 else torch.float32)


def _attention(q, k, v, mask, scale):
    return q.new_empty(q.shape)


def register() -> None:
    """Register the fake implementations (idempotent; the ops must be loaded)."""
    if _done:
        return
    for op in ("packed_mm", "packed_mm_q4i8", "packed_mm_q8i8"):
        torch.library.register_fake(f"ttq_cpu::{op}")(_product)
    torch.library.register_fake("ttq_cpu::dequant")(_dequant)
    torch.library.register_fake("ttq_cpu::decode_attention")(_attention)
    _done.append(True)
