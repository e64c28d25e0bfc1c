"""Runtime modes of the TTQ layers of a model (TTQ paper, Section 2 eq. 3 and Appendix H).

``set_mode(model, "prompt")`` makes every :class:`ttq.nn.TTQLinear` quantize
once per prompt and decode from packed low-bit weights; ``"per_sequence"``
(the default, the paper's evaluation) quantizes at every forward.  In prompt
mode each layer's :class:`ttq.nn.prompt.PromptState` runs the two steps of
generation, ``prefill`` and ``decode``, and nothing else is needed around
``model.generate``: a forward with more than one token per sequence is a
prefill and re-quantizes, one-token forwards are decode steps that reuse the
packed weights.  A batch of prompts shares one ``s`` (the statistic
covers all their real tokens: positions the ``attention_mask`` marks as padding are left out,
:mod:`ttq.patch.tokens`).  A one-token prompt
after another prompt looks like a decode step: call :func:`reset` first.

Example::

    ttq.quantize_(model, ttq.TTQConfig(quant=ttq.QuantSpec(bits=4, group_size=32)))
    ttq.runtime.set_mode(model, "prompt", refresh_every=0)
    out = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=64)
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch.nn as nn

from ttq.nn.linear import MODES, PromptOptions, TTQLinear


def ttq_layers(model: nn.Module) -> list[TTQLinear]:
    """The TTQLinear modules of ``model`` in module order."""
    return [m for m in model.modules() if isinstance(m, TTQLinear)]


def test_time_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of a quantized ``model`` that take a statistic of their own tokens (they carry a
    ``token_mask``; TTQ, its low-rank and pruning variants, AWP's test-time rows), whatever method made them."""
    return [m for m in model.modules() if hasattr(m, "token_mask") and isinstance(getattr(m, "original", None), nn.Module)]


def check_held_out(model: nn.Module) -> None:
    """Held-out scoring needs every test-time layer in prompt mode (quantized once from the prompt); a layer
    that quantizes at every forward would take its statistic from the scored tokens."""
    bad = sorted({type(m).__name__ for m in test_time_layers(model)
                  if not (isinstance(m, TTQLinear) and m.mode == "prompt")})
    if bad:
        raise ValueError(f"held-out scoring runs test-time layers in prompt mode, and {', '.join(bad)} layers "
                         "have none or are not in it; held-out scoring supports static methods and TTQ rows "
                         "(TTQLinear, any rank and refinement), with ttq.runtime.set_mode(model, 'prompt')")


def set_mode(
    model: nn.Module,
    mode: str,
    refresh_every: int = 0,
    layout: str | None = None,
    strict: bool = False,
    reference: bool = False,
    half_params: bool | None = None,
) -> int:
    """Set the runtime mode of every TTQLinear of ``model`` (dropping packed state).

    Args:
        model: a model quantized with ``ttq.quantize_(model, TTQConfig(...))``.
        mode: ``"per_sequence"`` or ``"prompt"``.
        refresh_every, layout, strict, reference, half_params: :class:`ttq.nn.linear.PromptOptions`
            (prompt mode only).
    Returns:
        the number of layers set.
    """
    if mode not in MODES:
        raise ValueError(f"unknown TTQ runtime mode {mode!r}; allowed: {', '.join(MODES)}")
    options = PromptOptions(refresh_every=refresh_every, layout=layout, strict=strict, reference=reference,
                            half_params=half_params)
    layers = ttq_layers(model)
    if not layers:
        raise ValueError("the model has no TTQLinear layers; quantize it first with ttq.quantize_(model, TTQConfig(...))")
    for m in layers:
        m.set_mode(mode, options)
    _drop_stacks(model)
    return len(layers)


def reset(model: nn.Module) -> None:
    """Drop every layer's packed weights (the next forward quantizes again)."""
    for m in ttq_layers(model):
        m.reset()
    _drop_stacks(model)


def _drop_stacks(model: nn.Module) -> None:
    """Fused groups (:mod:`ttq.nn.fused`) drop their stacked products with their members' packed weights."""
    from ttq.nn.fused import drop_stacks

    drop_stacks(model)


@contextlib.contextmanager
def holding(model: nn.Module) -> Iterator[None]:
    """Inside the block, prompt-mode layers that hold a packed prompt run every forward on it, whatever its
    token count (no re-quantization): a multi-token continuation after a prefill, e.g. held-out tokens scored
    with the prompt's quantization (:func:`ttq.eval.ppl.window_nll` with ``prompt_tokens``)."""
    layers = [m for m in ttq_layers(model) if m.mode == "prompt"]
    for m in layers:
        m.prompt.hold = True
    try:
        yield
    finally:
        for m in layers:
            m.prompt.hold = False


def quantization_seconds(model: nn.Module) -> float:
    """Total wall time the TTQ layers spent quantizing in prompt mode since their last reset."""
    return sum(m.prompt.seconds for m in ttq_layers(model))


def packed_bytes(model: nn.Module) -> int:
    """Bytes of packed codes + scales + zeros currently held (prompt mode)."""
    return sum(m.prompt.packed.nbytes() for m in ttq_layers(model) if m.prompt.packed is not None)


def decode_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads (prompt mode, after a prefill), for bandwidth arithmetic.

    A packed product (a TTQ layer's, a packed head's) counts its codes, scales, zeros, ``s``, low-rank
    factors and bias, and stands in for the float weight it was packed from; every other parameter counts
    in full, but the input embedding, of which a step reads one row (all of it when it is also the unpacked
    output head).  Tensors shared by several modules count once.  The KV cache is not counted, nor buffers;
    a mixture-of-experts model counts every packed expert (a step reads the routed ones only: an upper bound).
    """
    from ttq.nn.packed_head import PackedHeadLinear

    total, replaced = 0, set()
    for m in model.modules():
        if isinstance(m, TTQLinear) and m.prompt.linear is not None:
            total += m.prompt.linear.nbytes()
            replaced.update(id(p) for p in (m.weight, m.bias))
        elif isinstance(m, PackedHeadLinear):
            total += m.linear.nbytes()
            replaced.update(id(p) for p in (m.original.weight, m.original.bias))
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    whole_table = isinstance(head, nn.Linear) and head.weight is emb  # tied and unpacked: the head reads all of it
    if not whole_table:
        total += emb[0].numel() * emb.element_size()
        replaced.add(id(emb))
    return total + sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in replaced)


def packed_layouts(model: nn.Module) -> dict[str, int]:
    """How many TTQ layers currently hold packed weights in each layout (prompt mode), e.g. ``{"cpu_q4": 210}``;
    ``u8`` is the reference path (no kernel fits, or ``TTQ_DISABLE_KERNELS=1``)."""
    return dict(Counter(m.prompt.packed.layout for m in ttq_layers(model) if m.prompt.packed is not None))


I8_HEAD_LAYOUTS = {4: "cpu_q4_i8", 5: "cpu_q8_i8", 6: "cpu_q8_i8", 7: "cpu_q8_i8", 8: "cpu_q8_i8"}  # head bits -> i8 layout


def head_layout(blocks_layout: str | None, head_bits: int, group_size: int, model: nn.Module) -> str | None:
    """The packed head's layout to go with the blocks' ``blocks_layout``: the int8-activation layout of
    ``head_bits`` when ``blocks_layout`` is one (ends with ``_i8``) and it can pack the head, else None (default)."""
    from ttq.formats.affine import QuantSpec
    from ttq.kernels.api import can_pack

    lay = I8_HEAD_LAYOUTS.get(head_bits) if blocks_layout is not None and blocks_layout.endswith("_i8") else None
    head = model.get_output_embeddings()
    if lay is None or not isinstance(head, nn.Linear):
        return None
    w = head.weight
    return lay if can_pack(lay, QuantSpec(bits=head_bits, group_size=group_size), tuple(w.shape), w.device.type,
                           w.dtype) else None


def quantize_lm_head(model: nn.Module, bits: int = 8, group_size: int = 32, layout: str | None = None,
                     half_params: bool | None = None) -> nn.Module:
    """Replace the output head (``model.get_output_embeddings()``) by a packed RTN copy.

    Opt-in and outside the paper's setting (which keeps the head in full precision): it
    speeds decoding of small models whose head is a large share of the weights read per
    token.  :func:`ttq.patch.restore_` puts the original head back.

    Args:
        model: a transformers causal LM.
        bits, group_size: RTN codes of the head (8-bit keeps the logits close to full precision).
        layout: packed layout (None = best for the device).
        half_params: float16 scale / zero (``cpu_q*`` layouts); None = the option ``half_params``.
    Returns:
        the new head module.
    """
    from ttq.formats.affine import QuantSpec
    from ttq.nn.packed_head import PackedHeadLinear

    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if isinstance(head, PackedHeadLinear):
        raise ValueError("the LM head is already quantized; call ttq.restore_(model) first")
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the model has no nn.Linear output head to quantize (found {type(head).__name__})")
    new = PackedHeadLinear(head, QuantSpec(bits=bits, group_size=group_size), layout=layout, half_params=half_params)
    model.set_output_embeddings(new)
    return new
