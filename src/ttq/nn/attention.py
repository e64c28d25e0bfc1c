"""Decode attention on the key/value heads: transformers' SDPA attention without the cache copies of GQA.

With grouped-query attention (SmolLM2: 9 query heads over 3 key/value heads) transformers' SDPA path
repeats the key/value cache to one copy per query head before calling SDPA whenever it gets a mask and
runs under ``torch.compile`` (eagerly it packs the query instead).  The compiled decode step
(:mod:`ttq.compiled`) always has a mask (static cache), so every token copied the whole cache of every
layer three times: on SmolLM2 at 640 positions that is ~6 ms of a ~25 ms token, more than the packed
products of the q/k/v/o layers.  Here a single-token query is reshaped to ``(batch, kv_heads, group,
head_dim)`` and attends to the cache as it is, compiled or not; every other call (prefill, no GQA, soft
capping, position biases, per-head masks) is transformers' own SDPA function, unchanged but for one case: a
prompt at the start of a static cache comes with a mask over the whole cache, which :func:`causal_from_start`
recognises as plain causal attention and drops, so SDPA attends to the prompt's positions with ``is_causal``
(its fastest CPU kernel), as it does for a dynamic cache.

On the CPU with ttq's C++ extension, float32 single-token attention runs in ``torch.ops.ttq_cpu.decode_attention``
(``csrc/attention.inc``; a fake implementation lets ``torch.compile`` trace it) instead of SDPA, with or without
grouped-query attention: it reads only the positions the mask opens, where SDPA reads the whole static cache
(SmolLM2 at 576 of 768 positions: 25 % fewer bytes; Gemma3's 256-wide heads: 2.7x faster than SDPA in a scratch
timing of 30 layers).  It also reads a float16 or bfloat16 cache (:func:`ttq.compiled.narrow_cache`) as it is,
widening in registers; every other path widens a 16-bit cache to the query's dtype first.

The function is registered under :data:`NAME` in transformers' ``AttentionInterface`` (and its mask
builder is SDPA's), so it works for every architecture that calls attention through that interface,
with no code per architecture.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

NAME = "ttq_sdpa"
_KERNEL: list[bool] = []  # whether ttq_cpu.decode_attention runs here, once known (a plain bool: dynamo traces it)


def kernel_available() -> bool:
    """Whether the C++ single-token attention (``torch.ops.ttq_cpu.decode_attention``) runs in this process."""
    if not _KERNEL:
        from ttq.kernels import cpu_build

        _KERNEL.append(bool(cpu_build.load()))
    return _KERNEL[0]


def decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` (batch, heads, q_len, dim), ``key``/``value``
    (batch, kv_heads, kv_len, dim), ``attention_mask`` boolean or additive (batch, 1, q_len, kv_len) or None.

    Returns:
        ``(output (batch, q_len, heads, dim), None)`` like transformers' SDPA function.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_len, _ = query.shape
    plain = (kwargs.get("softcap") is None and kwargs.get("position_bias") is None
             and not kwargs.get("output_attentions", False) and dropout == 0.0)
    mask_ok = attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1)
    kernel = _KERNEL[0] if _KERNEL else False
    kernel = kernel and query.device.type == "cpu" and query.dtype == torch.float32 and key.dtype == value.dtype \
        and key.dtype in (torch.float32, torch.float16, torch.bfloat16) and (
            attention_mask is None or attention_mask.dtype in (torch.bool, torch.float32))
    one_token = q_len == 1 and (groups > 1 or kernel) and plain and mask_ok and heads == key.shape[1] * groups
    if not (one_token and kernel) and key.dtype != query.dtype:  # a 16-bit cache: widened for SDPA
        key, value = key.to(query.dtype), value.to(query.dtype)
    if not one_token:
        if q_len > 1 and attention_mask is not None and key.shape[-2] > q_len and not torch.compiler.is_compiling() \
                and causal_from_start(attention_mask, q_len):
            attention_mask = None  # transformers' SDPA then attends to the first q_len positions with is_causal
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # one query token: the `groups` query heads of a key/value head become `groups` query rows of that head
    packed = query.reshape(batch, key.shape[1], groups, query.shape[-1])
    if kernel:  # reads only the cache positions the mask opens
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = torch.ops.ttq_cpu.decode_attention(packed, key, value, attention_mask, scale)
    else:
        out = F.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(out.shape[0], heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def causal_from_start(mask: torch.Tensor, q_len: int) -> bool:
    """Whether a boolean ``mask`` (batch, 1, q_len, kv_len) is plain causal attention of a prompt that starts at
    position 0 of the cache: its first ``q_len`` columns lower-triangular, the rest closed.  A static cache's
    prefill gets such a mask over the whole cache (transformers cannot skip it there); attending to the first
    ``q_len`` positions with ``is_causal`` instead is the same attention in SDPA's fastest CPU kernel (a scratch
    timing on Gemma3-270M's 512-token prefill: 470 ms of masked attention over 640 positions against 342 ms).
    Padding, a window shorter than the prompt, or a prompt after earlier positions all give False."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-2] != q_len:
        return False
    if mask[..., q_len:].any():
        return False
    tril = torch.ones(q_len, q_len, dtype=torch.bool, device=mask.device).tril_()
    return bool((mask[..., :q_len] == tril).all())


def register() -> str:
    """Register :func:`decode_attention` (and SDPA's mask builder) with transformers under :data:`NAME`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def use(model: nn.Module) -> str | None:
    """Switch ``model`` from transformers' ``sdpa`` attention to :data:`NAME`; returns the implementation it
    had (to give back with ``model.set_attn_implementation``), or None when it was not ``sdpa`` (left as is:
    eager, flash and flex attention do not repeat the cache the same way)."""
    current = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if current != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return None
    kernel_available()  # decided here, eagerly, so that a compiled step reads a plain bool
    model.set_attn_implementation(register())
    return current
