"""What an exporter reads from a quantized model: each layer's codes, group parameters and format as plain
data (:class:`QuantizedWeight`), and the model's other tensors.

Only static layers whose effective weight is ``dequant(codes)`` export: a
:class:`~ttq.nn.linear.StaticQuantLinear` without an input scale (fold it first: :func:`ttq.export.fold.fold_`).
Refused with what to do instead: a layer that still has an input scale, GPTQ's act-order on
dynamic groups (:class:`~ttq.nn.gptq_linear.PermutedQuantLinear`: its groups are runs of *permuted*
columns, which needs a ``g_idx`` that neither compressed-tensors >= 0.20 nor GGUF has; GPTQ with
``static_groups=True`` keeps natural groups and exports exactly), and test-time layers (TTQ and the other
online methods quantize from each input; export a TTQ snapshot instead, :mod:`ttq.export.snapshot`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ttq.errors import ConfigError
from ttq.formats.affine import QuantSpec, dequantize
from ttq.nn.gptq_linear import PermutedQuantLinear
from ttq.nn.linear import StaticQuantLinear


@dataclass
class QuantizedWeight:
    """One exported layer: ``W_hat = dequant(codes, scale, zero)`` (d_out, d_in) in ``spec``'s format.

    Args:
        codes: uint8 (d_out, d_in), natural column order.
        scale, zero: float32 (d_out, n_groups).
        spec: bits, group size, symmetric, format.
        bias: (d_out,) or None.
        fallback: ``"rtn"`` when the export re-quantized the layer with round-to-nearest (its input scale
            could not be folded), else None.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec
    bias: torch.Tensor | None = None
    fallback: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """``W_hat`` (d_out, d_in) float32: ttq's own effective weight of the layer."""
        return dequantize(self.codes, self.scale, self.zero, self.spec.group_size, fmt=self.spec.fmt)


def _test_time(m: nn.Module) -> bool:
    return isinstance(getattr(m, "original", None), nn.Module) and m.original is not m


def quantized_weights(model: nn.Module) -> dict[str, QuantizedWeight]:
    """``{module name: QuantizedWeight}`` of every quantized layer, in module order (tensors on the CPU).

    Raises:
        ConfigError: a layer that cannot be exported as it is (the module docstring), naming it and what to do.
    """
    out: dict[str, QuantizedWeight] = {}
    for name, m in model.named_modules():
        if isinstance(m, PermutedQuantLinear):
            raise ConfigError(
                f"layer {name!r} is GPTQ with act-order on dynamic groups (groups of permuted columns): neither "
                "compressed-tensors (its g_idx 'group' act-order was removed in 0.20) nor GGUF can hold it; quantize "
                "with GPTQConfig(act_order=True, static_groups=True), which exports exactly")
        if isinstance(m, StaticQuantLinear):
            if m.input_scale is not None:
                raise ConfigError(f"layer {name!r} still divides its input by an input scale (AWQ / scaled methods); "
                                  "fold it first with ttq.export.fold.fold_(model)")
            bias = None if m.bias is None else m.bias.detach().float().cpu()
            out[name] = QuantizedWeight(m.codes.cpu(), m.scale.float().cpu(), m.zero.float().cpu(), m.spec, bias,
                                        getattr(m, "export_fallback", None))
        elif _test_time(m) and not isinstance(m, StaticQuantLinear):
            raise ConfigError(
                f"layer {name!r} is a {type(m).__name__}: a test-time method quantizes from each input and has no "
                "fixed quantized weight to export; export a TTQ snapshot (ttq export --method ttq --from-text FILE, "
                "ttq.export.snapshot) or a static method")
    return out


def dense_tensors(model: nn.Module, quantized: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` without the entries of the quantized layers (their ``.original`` and
    buffers) and without tied copies (``model.all_tied_weights_keys``: an engine ties them itself)."""
    out = {}
    prefixes = tuple(f"{n}." for n in quantized)
    for key, t in model.state_dict().items():
        if key.startswith(prefixes):
            continue
        out[key] = t
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target in out and source in out and out[target].data_ptr() == out[source].data_ptr():
            del out[target]
    return out


def tied_embeddings(model: nn.Module) -> bool:
    """Whether the LM head shares the input embedding's tensor."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and emb is not None and head.weight.data_ptr() == emb.weight.data_ptr()
