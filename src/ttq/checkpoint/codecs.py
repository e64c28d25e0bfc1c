"""How each quantized module type is written to and rebuilt from a checkpoint (one codec per type).

A codec turns a module into ``(args, tensors)`` -- plain JSON and named tensors, stored as the
layer's record in ``config.json`` and as ``<layer>.<tensor>`` in ``model.safetensors`` -- and
rebuilds the same module type from them, so the loaded model computes the same numbers.

==============  =========================  ==================================================
codec           module                     tensors (``weight`` is always 1-D)
==============  =========================  ==================================================
``static``      StaticQuantLinear          weight = packed codes, weight_scale, weight_zero
                (RTN, AWQ, AWP, GPTQ)      (left out when all zero: codebook formats),
                                           input_scale (AWQ / scaled methods), bias
``permuted``    PermutedQuantLinear        as ``static`` + weight_perm (GPTQ act-order)
``ttq``         TTQLinear                  weight (full precision, flattened), lr_b, lr_a
                                           (the static rank-r factors; r = 0: none), bias;
                                           args ``refine`` when on-the-fly refinements are on
``ttq_lowrank`` LowRankTTQLinear           weight, lr_b, lr_a (float32), bias
``ttq_online``  OnlineLowRankTTQLinear     weight, u0, u, sv (the tracked state), bias
``awp_online``  AWPLinear                  weight, bias
``prune``       TTQPruneLinear             weight, bias
==============  =========================  ==================================================

Static methods store no full-precision copy of their weights; test-time methods store the
full-precision weight they quantize from.  A module type of your own is saved once it has a codec:
``register_codec(Codec("mine", MyLinear, encode, decode))``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ttq.checkpoint.format import pack_codes, unpack_codes
from ttq.errors import ConfigError, ModelError
from ttq.formats.affine import QuantSpec
from ttq.methods.refine import RefineSpec
from ttq.methods.scaling import ScaleSpec
from ttq.nn.awp_linear import AWPLinear
from ttq.nn.gptq_linear import PermutedQuantLinear
from ttq.nn.linear import StaticQuantLinear, TTQLinear
from ttq.nn.lowrank_linear import LowRankTTQLinear, OnlineLowRankTTQLinear
from ttq.nn.prune_linear import TTQPruneLinear

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Codec:
    """The checkpoint form of one quantized module type.

    Args:
        name: the ``"module"`` of a layer record.
        module_type: the class it saves (exact type, not subclasses).
        encode: ``module -> (args, tensors)``; args JSON-able, tensors named without the layer prefix.
        decode: ``(args, tensors, dtype) -> module``; ``dtype`` is the layer dtype of the loading model.
        config: ``module -> config or None``: the method config, where the module alone determines it.
        follow_dtype: tensors stored in the layer dtype (cast with the model when loaded in another dtype).
    """

    name: str
    module_type: type
    encode: Callable[[nn.Module], tuple[dict, Tensors]]
    decode: Callable[[dict, Tensors, torch.dtype], nn.Module]
    config: Callable[[nn.Module], Any] = lambda _m: None
    follow_dtype: tuple[str, ...] = ("weight", "bias")


CODECS: dict[str, Codec] = {}
BY_TYPE: dict[type, Codec] = {}


def register_codec(codec: Codec) -> Codec:
    """Make ``codec.module_type`` savable (and records naming ``codec.name`` loadable)."""
    CODECS[codec.name] = codec
    BY_TYPE[codec.module_type] = codec
    return codec


def codec_named(name: Any, where: str) -> Codec:
    if name not in CODECS:
        raise ModelError(f"{where}: unknown module kind {name!r}; this ttq knows {', '.join(sorted(CODECS))} "
                         "(written by a newer ttq or with a plug-in that is not imported)")
    return CODECS[name]


# ---------------------------------------------------------------- helpers


def parse_spec(cls: type, value: Any, where: str) -> Any:
    """A QuantSpec / ScaleSpec from its JSON dict (None stays None); ModelError when it does not fit."""
    if value is None:
        return None
    try:
        return cls(**value)
    except (TypeError, ValueError, ConfigError) as e:
        raise ModelError(f"{where}: bad {cls.__name__} {value!r} ({e})") from None


def _linear(args: dict, tensors: Tensors, dtype: torch.dtype) -> nn.Linear:
    """The ``nn.Linear`` a module wraps: the loaded weight (reshaped to (d_out, d_in)) and bias, or, for
    static layers (no weight stored), a meta stand-in that only carries the shape and the layer dtype."""
    d_in, d_out = args["in_features"], args["out_features"]
    lin = nn.Linear(d_in, d_out, bias=False, device="meta", dtype=dtype)
    if "weight" in tensors and tensors["weight"].is_floating_point():
        lin.weight = nn.Parameter(tensors["weight"].reshape(d_out, d_in))  # (d_out d_in,) -> (d_out, d_in)
    if "bias" in tensors:
        lin.bias = nn.Parameter(tensors["bias"])
    return lin


def _shape(m: nn.Module) -> dict:
    return {"in_features": m.in_features, "out_features": m.out_features}


def _full(m: nn.Module) -> Tensors:
    """The flattened full-precision weight and the bias of a test-time layer."""
    t = {"weight": m.weight.detach().reshape(-1)}  # (d_out, d_in) -> (d_out d_in,)
    if m.bias is not None:
        t["bias"] = m.bias.detach()
    return t


# ---------------------------------------------------------------- static layers


def _encode_static(m: nn.Module) -> tuple[dict, Tensors]:
    t = {"weight": pack_codes(m.codes, m.spec.bits), "weight_scale": m.scale}
    if bool(m.zero.any()):
        t["weight_zero"] = m.zero
    if m.input_scale is not None:
        t["input_scale"] = m.input_scale
    if isinstance(m, PermutedQuantLinear):
        t["weight_perm"] = m.perm
    if m.bias is not None:
        t["bias"] = m.bias.detach()
    return {**_shape(m), "quant": dataclasses.asdict(m.spec)}, t


def _decode_static(args: dict, t: Tensors, dtype: torch.dtype) -> nn.Module:
    spec = parse_spec(QuantSpec, args["quant"], "static layer")
    codes = unpack_codes(t["weight"], spec.bits, (args["out_features"], args["in_features"]))
    scale = t["weight_scale"]
    zero = t.get("weight_zero", torch.zeros_like(scale))
    stub = _linear(args, t, dtype)
    if "weight_perm" in t:
        mod = PermutedQuantLinear(stub, codes, scale, zero, spec, t["weight_perm"], t.get("input_scale"))
        mod.original = None  # no full-precision layer to restore
        return mod
    return StaticQuantLinear(stub, codes, scale, zero, spec, t.get("input_scale"), keep_original=False)


register_codec(Codec("static", StaticQuantLinear, _encode_static, _decode_static, follow_dtype=("bias",)))
register_codec(Codec("permuted", PermutedQuantLinear, _encode_static, _decode_static, follow_dtype=("bias",)))


# ---------------------------------------------------------------- test-time layers


def _encode_ttq(m: TTQLinear) -> tuple[dict, Tensors]:
    t = _full(m)
    if m.rank:
        t["lr_b"], t["lr_a"] = m.lr_b, m.lr_a
    args = {**_shape(m), "quant": dataclasses.asdict(m.spec), "scale": dataclasses.asdict(m.scale_spec),
            "rank": m.rank}
    if m.refine is not None:  # on-the-fly refinements run again at every forward of the loaded model
        args["refine"] = dataclasses.asdict(m.refine)
    return args, t


def _decode_ttq(args: dict, t: Tensors, dtype: torch.dtype) -> TTQLinear:
    where = "ttq layer"
    mod = TTQLinear(_linear(args, t, dtype), parse_spec(QuantSpec, args["quant"], where),
                    parse_spec(ScaleSpec, args["scale"], where), rank=0,  # rank 0: no SVD, the factors are stored
                    refine=parse_spec(RefineSpec, args.get("refine"), where))
    if args["rank"]:
        mod.rank, mod.lr_b, mod.lr_a = args["rank"], t["lr_b"], t["lr_a"]
    return mod


def _ttq_config(m: TTQLinear):
    from ttq.quantizers.ttq import TTQConfig

    return TTQConfig(quant=m.spec, scale=m.scale_spec, rank=m.rank, refine=m.refine)


register_codec(Codec("ttq", TTQLinear, _encode_ttq, _decode_ttq, _ttq_config,
                     follow_dtype=("weight", "bias", "lr_b", "lr_a")))


def _encode_lowrank(m: LowRankTTQLinear) -> tuple[dict, Tensors]:
    args = {**_shape(m), "quant": dataclasses.asdict(m.spec), "scale": dataclasses.asdict(m.scale_spec),
            "init": m.init}
    return args, {**_full(m), "lr_b": m.lr_b, "lr_a": m.lr_a}


def _decode_lowrank(args: dict, t: Tensors, dtype: torch.dtype) -> LowRankTTQLinear:
    where = "ttq_lowrank layer"
    return LowRankTTQLinear(_linear(args, t, dtype), parse_spec(QuantSpec, args["quant"], where),
                            parse_spec(ScaleSpec, args["scale"], where), t["lr_b"], t["lr_a"], init=args["init"])


register_codec(Codec("ttq_lowrank", LowRankTTQLinear, _encode_lowrank, _decode_lowrank))

_ONLINE_FIELDS = ("rank", "rule", "lr", "decay", "chunk", "power_iters")


def _encode_online(m: OnlineLowRankTTQLinear) -> tuple[dict, Tensors]:
    args = {**_shape(m), "quant": dataclasses.asdict(m.spec), "scale": dataclasses.asdict(m.scale_spec),
            **{f: getattr(m, f) for f in _ONLINE_FIELDS}, "n_updates": m.n_updates}
    t = _full(m)
    if m.rank:
        t.update(u0=m.u0, u=m.u, sv=m.sv)
    return args, t


def _decode_online(args: dict, t: Tensors, dtype: torch.dtype) -> OnlineLowRankTTQLinear:
    where = "ttq_online layer"
    mod = OnlineLowRankTTQLinear(_linear(args, t, dtype), parse_spec(QuantSpec, args["quant"], where),
                                 parse_spec(ScaleSpec, args["scale"], where), 0, args["rule"], args["lr"],
                                 args["decay"], args["chunk"], args["power_iters"])  # rank 0: no SVD, state stored
    if args["rank"]:
        mod.rank, mod.u0, mod.u, mod.sv = args["rank"], t["u0"], t["u"], t["sv"]
    mod.n_updates = args["n_updates"]
    return mod


def _online_config(m: OnlineLowRankTTQLinear):
    from ttq.quantizers.lowrank import OnlineLowRankTTQConfig

    return OnlineLowRankTTQConfig(quant=m.spec, scale=m.scale_spec, **{f: getattr(m, f) for f in _ONLINE_FIELDS})


register_codec(Codec("ttq_online", OnlineLowRankTTQLinear, _encode_online, _decode_online, _online_config))

_AWP_FIELDS = ("iters", "step", "shrink", "fixed_grid")


def _encode_awp(m: AWPLinear) -> tuple[dict, Tensors]:
    args = {**_shape(m), "quant": dataclasses.asdict(m.spec), "scale": dataclasses.asdict(m.scale_spec),
            **{f: getattr(m, f) for f in _AWP_FIELDS}}
    return args, _full(m)


def _decode_awp(args: dict, t: Tensors, dtype: torch.dtype) -> AWPLinear:
    where = "awp_online layer"
    return AWPLinear(_linear(args, t, dtype), parse_spec(QuantSpec, args["quant"], where),
                     parse_spec(ScaleSpec, args["scale"], where), *(args[f] for f in _AWP_FIELDS))


def _awp_config(m: AWPLinear):
    from ttq.quantizers.awp import AWPConfig

    return AWPConfig(quant=m.spec, scale=m.scale_spec, online=True, **{f: getattr(m, f) for f in _AWP_FIELDS})


register_codec(Codec("awp_online", AWPLinear, _encode_awp, _decode_awp, _awp_config))


def _encode_prune(m: TTQPruneLinear) -> tuple[dict, Tensors]:
    args = {**_shape(m), "sparsity": m.sparsity, "n_m": None if m.n_m is None else list(m.n_m),
            "quant": None if m.spec is None else dataclasses.asdict(m.spec),
            "scale": dataclasses.asdict(m.scale_spec), "order": m.order, "score": m.score}
    return args, _full(m)


def _decode_prune(args: dict, t: Tensors, dtype: torch.dtype) -> TTQPruneLinear:
    where = "prune layer"
    n_m = None if args["n_m"] is None else tuple(args["n_m"])
    return TTQPruneLinear(_linear(args, t, dtype), args["sparsity"], n_m, parse_spec(QuantSpec, args["quant"], where),
                          parse_spec(ScaleSpec, args["scale"], where), args["order"], args["score"])


def _prune_config(m: TTQPruneLinear):
    from ttq.quantizers.prune import PruneConfig

    return PruneConfig(sparsity=m.sparsity, n_m=m.n_m, quant=m.spec, scale=m.scale_spec, order=m.order, score=m.score)


register_codec(Codec("prune", TTQPruneLinear, _encode_prune, _decode_prune, _prune_config))
