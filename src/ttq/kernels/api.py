"""Packed low-bit weights and the one dispatch point for TTQ kernels.

TTQ paper, Section 2 (eq. 3) and Appendix H: the prompt's statistic ``s`` (the
diagonal ``D^{1/2}``) quantizes ``(W - B A) diag(s)`` once, and every decode step
computes ``y = deq(Wq) (x / s) + B (A x) + bias`` from packed low-bit codes.

Three functions are the whole public surface; every kernel sits behind them:

* :func:`pack_ttq` -- codes of ``(W - B A) diag(s)`` (groupwise affine, see
  :mod:`ttq.formats.affine`), packed into a named layout in one pass;
* :func:`packed_linear` -- ``y = deq(packed) @ (x / s) + B (A x) + bias``;
* :func:`pack_linear` -- both at once for callers that run one packed weight many
  times (prompt mode, :mod:`ttq.nn.prompt`; the packed LM head): it packs once and
  returns a :class:`PackedLinear`, the packed weight with its kernel and its product's
  arguments bound (plus the kernel's one-token ``decoder`` when it has one), ``y = lin(x)``.

Layouts (one vocabulary; ``d_out, d_in = shape``, ``n_groups = ceil(d_in / g)``
with ``g`` the effective group size, ``group_size = -1`` meaning per output row):

==============  =========================================================================
layout          tensors (all row-major, contiguous)
==============  =========================================================================
``u8``          reference, any bits 2..8, any group size, any device.
                qweight uint8 (d_out, d_in), one code per byte;
                scale, zero float32 (d_out, n_groups).
``cpu_q8``      qweight uint8 (d_out, 16 * ceil(d_in / 16)), one code per byte, columns
                past d_in hold 0.
``cpu_q4``      qweight uint8 (d_out, 16 * ceil(d_in / 32)); per tile of 32 columns,
                byte j holds column 32 i + j (low nibble) and 32 i + 16 + j (high nibble).
``cpu_q4_i8``   the ``cpu_q4`` tensors (same packing); opt-in (priority below ``cpu_q4``, never
                picked by ``layout=None``): bits 4, g a multiple of 32 or -1, AVX-512 VNNI or AVX2.
                The product rounds ``x / s`` to int8 per 32 columns (absmax / 127), so results
                are not bit-identical to the reference (~0.5% relative on Gaussian inputs).
``cpu_q8_i8``   the ``cpu_q8`` tensors (same packing); opt-in like ``cpu_q4_i8`` (priority below
                ``cpu_q8``): bits 5..8, g a multiple of 32 or -1, AVX-512 VNNI or AVX2, int8 ``x / s``.
``cpu_q2``      qweight uint8 (d_out, 16 * ceil(d_in / 64)); per tile of 64 columns,
                byte j holds column 64 i + 16 k + j in bits 2k..2k+1, k = 0..3.
``cpu_q3``      qweight uint8 (d_out, 48 * ceil(d_in / 128)); per tile of 128 columns,
                16 little-endian 24-bit lanes (bytes 3j..3j+2 = lane j), lane j holding
                column 128 i + 16 k + j in bits 3k..3k+2, k = 0..7 (3 bits per weight).
==============  =========================================================================

For the ``cpu_q*`` layouts scale and zero are (d_out, n_groups) float32, so the
packed weights are exactly :func:`ttq.formats.affine.quantize` of ``(W - B A) * s``
computed in float32 (the per-sequence mode's weights); with ``half_params=True``
(:func:`pack_ttq`, ``PromptOptions``, ``--half-params``; :mod:`ttq.options` ``half_params``, from
``TTQ_HALF_PARAMS=1``, sets the default)
they are stored in float16 when every value fits: fewer bytes per decode step (4-bit g=32 weights read 0.625
instead of 0.75 bytes each, 8-bit ones 1.125 instead of 1.25).  The codes are chosen against the stored, rounded
scale / zero, so every weight stays within half a step of the grid it is read with, but at the two ends of a
group's range, which the rounding may shorten by 2^-10 (|zero| + qmax scale); precomputed codes
(:func:`pack_codes`) keep theirs, so float16 is used there only while the rounding moves no grid by more than an
eighth of a step.  The oracle dequantizes the stored values, so kernel and oracle see the same weights.  Padded
columns carry code 0 and never reach the output.

Other modules add layouts of their own (the CUDA/Triton ones document theirs in
:mod:`ttq.kernels.cuda_register`).  PyTorch's CPU int4 kernel
(``_weight_int4pack_mm_for_cpu``) is not used: with float32 activations it is
~50x slower than ``cpu_q4``; with bfloat16 activations it was faster, but its
packing (``_convert_weight_to_int4pack_for_cpu``) alone costs several times a
fused prompt-mode quantization of the same layer (measured on the development machine).

Kernels register with :func:`register_kernel` (a CUDA/Triton module can add its
own layouts for ``device_type="cuda"``); the built-in ones are the modules named in
``KERNEL_MODULES``, imported on first use.  Selection: an explicit ``layout``
must be supported or a ``ValueError`` is raised; ``layout=None`` takes the
highest-priority registered kernel of the weight's device that supports the
combination, else the ``u8`` reference path with one logged line (or a
``ValueError`` with ``strict=True``).  The option ``disable_kernels`` of
:mod:`ttq.options` (``TTQ_DISABLE_KERNELS=1`` in the environment at start-up) forces the
reference path.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ttq import options
from ttq.formats.spec import QuantSpec, num_groups

log = logging.getLogger(__name__)

REFERENCE_LAYOUT = "u8"
DISABLE_ENV = options.ENV_VARS["disable_kernels"]  # named in messages: the way users set the option
# The modules that register the built-in kernels (@register_kernel), imported in this order on first use
# (:func:`_load_builtin_kernels`): the u8 oracle, the cpu_q* layouts, the int8-activation cpu_q*_i8
# layouts, the CUDA layouts (Triton; skipped with a debug line when it is not installed).
KERNEL_MODULES = (
    "ttq.kernels.reference",
    "ttq.kernels.cpu",
    "ttq.kernels.cpu_i8",
    "ttq.kernels.cuda_register",
)


@dataclass(frozen=True)
class PackedWeight:
    """Packed quantized weight of a linear layer (see the module table for each layout).

    Args:
        layout: a registered layout name (``u8`` is the reference).
        bits: code width 2..8.
        group_size: the quantization group size as in :class:`QuantSpec` (-1 per row).
        shape: (d_out, d_in) of the unpacked weight.
        qweight: packed codes.
        scale: per-group scale (layout-specific dtype/shape).
        zero: per-group zero point, or None for layouts that fold it into ``scale``.
        fmt: the code format of :class:`QuantSpec` (``"int"`` affine; codebook formats
            such as ``"nf4"`` exist only in the ``u8`` reference layout).
    """

    layout: str
    bits: int
    group_size: int
    shape: tuple[int, int]
    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    fmt: str = "int"

    @property
    def n_groups(self) -> int:
        return num_groups(self.shape[1], self.group_size)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def nbytes(self) -> int:
        """Bytes of codes + scales + zeros (what a decode step reads)."""
        ts = [self.qweight, self.scale] + ([self.zero] if self.zero is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


class Kernel(Protocol):
    """What a registered kernel provides (methods are pure functions of tensors)."""

    def supports(self, spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype) -> str | None:
        """None when (spec, weight shape, weight dtype) is served, else the reason it is not."""

    def pack(
        self, w: torch.Tensor, s: torch.Tensor, spec: QuantSpec, b: torch.Tensor | None, a: torch.Tensor | None
    ) -> PackedWeight:
        """Codes of ``(W - B A) diag(s)`` in this layout (s is float32 (d_in,), never None)."""

    # Optional: ``pack_into(out, w, s, spec, b, a) -> PackedWeight`` re-quantizes into the tensors
    # of ``out`` (same layout and shape) instead of allocating; used by :func:`pack_ttq` with ``out=``.
    # Optional: a true ``half_params`` attribute: pack / pack_into accept ``half_params`` (float16
    # scale / zero, see :func:`pack_ttq`).
    # Optional: ``decoder(packed, s, bias, b, a) -> Callable | None`` returns ``x -> linear(x, packed,
    # s, bias, b, a)`` with the arguments bound once (prompt mode's per-token fast path; the bound
    # function returns None for inputs it does not take), or None; :func:`pack_linear` binds it.

    def linear(
        self,
        x: torch.Tensor,
        packed: PackedWeight,
        s: torch.Tensor | None,
        bias: torch.Tensor | None,
        b: torch.Tensor | None,
        a: torch.Tensor | None,
    ) -> torch.Tensor:
        """``deq(packed) @ (x / s) + B (A x) + bias`` for x (..., d_in) -> (..., d_out) in x's dtype."""

    def unpack(self, packed: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes uint8 (d_out, d_in), scale f32 (d_out, n_groups), zero f32 (d_out, n_groups))."""


@dataclass(frozen=True)
class _Entry:
    layout: str
    device_type: str
    kernel: Kernel
    priority: int


_REGISTRY: dict[tuple[str, str], _Entry] = {}
_LOGGED: set[str] = set()


def register_kernel(layout: str, device_type: str, priority: int = 0) -> Callable:
    """Decorator registering a kernel class (instantiated without arguments) or instance.

    Args:
        layout: the layout name it packs to / reads from.
        device_type: ``"cpu"``, ``"cuda"``, ...
        priority: larger wins when ``layout=None`` and several kernels support a combination.
    Returns:
        the decorator (returns its argument unchanged).
    """

    def deco(obj):
        kernel = obj() if isinstance(obj, type) else obj
        _REGISTRY[(layout, device_type)] = _Entry(layout, device_type, kernel, priority)
        return obj

    return deco


def registered_layouts(device_type: str | None = None) -> list[str]:
    """Registered layout names (for one device type, or all), reference included."""
    _load_builtin_kernels()
    names = {e.layout for e in _REGISTRY.values() if device_type is None or e.device_type == device_type}
    return [REFERENCE_LAYOUT] + sorted(names - {REFERENCE_LAYOUT})


def kernels_disabled() -> bool:
    """True when the option ``disable_kernels`` is on (:mod:`ttq.options`; ``TTQ_DISABLE_KERNELS=1`` at start-up)."""
    return options.current().disable_kernels


def log_once(msg: str) -> None:
    """Log ``msg`` at INFO the first time it is seen in this process."""
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        log.info(msg)


_BUILTINS_LOADED = False


def _load_builtin_kernels() -> None:
    """Import the modules of ``KERNEL_MODULES`` (lazily, once, never raising)."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    for mod in KERNEL_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # an optional dependency (triton, ...) is not installed
            log.debug("kernel module %s not loaded: %s", mod, e)
        except Exception as e:  # a broken optional kernel module must not break ttq
            log.warning("kernel module %s failed to load (%s: %s); using the reference path", mod, type(e).__name__, e)


def get_kernel(layout: str, device_type: str) -> Kernel:
    """The kernel registered for (layout, device_type); the reference serves ``u8`` everywhere."""
    _load_builtin_kernels()
    entry = _REGISTRY.get((layout, device_type)) or (
        _REGISTRY.get((REFERENCE_LAYOUT, "any")) if layout == REFERENCE_LAYOUT else None
    )
    if entry is None:
        known = ", ".join(f"{lay}@{dev}" for lay, dev in sorted(_REGISTRY))
        raise ValueError(f"no kernel registered for layout {layout!r} on device {device_type!r}; registered: {known}")
    return entry.kernel


def select_layout(
    spec: QuantSpec, shape: tuple[int, int], device_type: str, dtype: torch.dtype, layout: str | None = None,
    strict: bool = False,
) -> str:
    """The layout :func:`pack_ttq` will use (see the module docstring for the rules)."""
    _load_builtin_kernels()
    if layout is not None:
        if layout == REFERENCE_LAYOUT:
            return layout
        if kernels_disabled():
            raise ValueError(f"layout {layout!r} was requested but kernels are disabled ({DISABLE_ENV} / "
                             f"ttq.options disable_kernels); turn the option off or use layout=None")
        why = get_kernel(layout, device_type).supports(spec, shape, dtype)
        if why is not None:
            raise ValueError(f"layout {layout!r} cannot pack bits={spec.bits}, group_size={spec.group_size}, "
                             f"shape={tuple(shape)}, dtype={dtype}: {why}")
        return layout
    if kernels_disabled():
        if strict:
            raise ValueError(f"strict kernel selection but kernels are disabled ({DISABLE_ENV} / "
                             f"ttq.options disable_kernels)")
        log_once(f"kernels are disabled ({DISABLE_ENV} / ttq.options disable_kernels): packed weights use the "
                 f"reference layout 'u8'")
        return REFERENCE_LAYOUT
    reasons = []
    for e in sorted(_REGISTRY.values(), key=lambda e: -e.priority):
        if e.device_type != device_type or e.layout == REFERENCE_LAYOUT:
            continue
        why = e.kernel.supports(spec, shape, dtype)
        if why is None:
            return e.layout
        reasons.append(f"{e.layout}: {why}")
    msg = (f"no compiled kernel for bits={spec.bits}, group_size={spec.group_size}, shape={tuple(shape)}, "
           f"dtype={dtype} on {device_type} ({'; '.join(reasons) or 'none registered'}); using the reference path")
    if strict:
        raise ValueError(msg)
    log_once(msg)
    return REFERENCE_LAYOUT


def can_pack(layout: str, spec: QuantSpec, shape: tuple[int, int], device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``layout`` is registered and supports ``spec`` for a weight of ``shape`` (no logging, no raise)."""
    try:
        select_layout(spec, shape, device_type, dtype, layout)
    except ValueError:  # not registered, unsupported combination, VNNI missing, kernels disabled
        return False
    return True


def _check_product_args(
    shape: tuple[int, int], s: torch.Tensor | None, b: torch.Tensor | None, a: torch.Tensor | None,
    bias: torch.Tensor | None = None,
) -> None:
    """The product's arguments fit a weight of ``shape`` (d_out, d_in): ``s`` (d_in,), the factor pair, ``bias``."""
    d_out, d_in = shape
    if s is None or s.shape != (d_in,):
        got = None if s is None else tuple(s.shape)
        raise ValueError(f"scale s has shape {got}, expected ({d_in},) for weight {tuple(shape)}")
    if (b is None) != (a is None):
        raise ValueError("low-rank factors come in pairs: give both b (d_out, r) and a (r, d_in) or neither")
    if b is not None and (b.dim() != 2 or a.dim() != 2 or b.shape[0] != d_out or a.shape[1] != d_in
                          or b.shape[1] != a.shape[0]):
        raise ValueError(f"low-rank factors must be b (d_out={d_out}, r) and a (r, d_in={d_in}), "
                         f"got {tuple(b.shape)} and {tuple(a.shape)}")
    if bias is not None and bias.shape != (d_out,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({d_out},)")


def _check_ttq_args(
    w: torch.Tensor, s: torch.Tensor | None, b: torch.Tensor | None, a: torch.Tensor | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Check a weight and its product's arguments; ``s`` as float32 (ones when None)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (d_out, d_in), got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"weight must be a floating-point tensor, got {w.dtype}")
    if s is None:
        s = torch.ones(w.shape[1], dtype=torch.float32, device=w.device)
    _check_product_args(tuple(w.shape), s, b, a, bias)
    return s.float()


def pack_ttq(
    w: torch.Tensor,
    s: torch.Tensor | None,
    spec: QuantSpec,
    b: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
    layout: str | None = None,
    strict: bool = False,
    out: PackedWeight | None = None,
    half_params: bool | None = None,
) -> PackedWeight:
    """Quantize ``(W - B A) diag(s)`` groupwise and pack it.

    Args:
        w: weight (d_out, d_in), float32 / bfloat16 / float16.  Pass the residual
            ``W - B A`` itself (and no b, a) when it is cached: it skips one GEMM.
        s: per-input-channel scale (d_in,) (None = ones, plain RTN).
        spec: the affine format (bits, group_size, symmetric, nu).
        b, a: optional low-rank factors (d_out, r), (r, d_in) subtracted before quantizing.
        layout: a registered layout name, or None to pick the best for w's device.
        strict: with layout=None, raise instead of falling back to the reference.
        out: a previous result for the same weight; when its layout and format match and the
            kernel has ``pack_into``, its tensors are overwritten (no new allocation) and shared
            by the returned weight.
        half_params: store scale / zero in float16 (fewer bytes per decode step, :func:`wants_half`);
            None = the option ``half_params`` of :mod:`ttq.options`
            (``TTQ_HALF_PARAMS`` at start-up; off).  Only the ``cpu_q*`` layouts store float16; True
            with another layout raises.
    Returns:
        a :class:`PackedWeight`.
    """
    s = _check_ttq_args(w, s, b, a)
    return _pack(w, s, spec, b, a, layout, strict, out, half_params)[0]


def wants_half(half_params: bool | None) -> bool:
    """float16 scale / zero in the ``cpu_q*`` layouts: ``half_params``, None = the option ``half_params`` of
    :mod:`ttq.options` (``TTQ_HALF_PARAMS=1`` at start-up; off)."""
    return bool(options.current().half_params if half_params is None else half_params)


def _pack(
    w: torch.Tensor, s: torch.Tensor, spec: QuantSpec, b: torch.Tensor | None, a: torch.Tensor | None,
    layout: str | None, strict: bool, out: PackedWeight | None, half_params: bool | None,
) -> tuple[PackedWeight, Kernel]:
    """:func:`pack_ttq` on checked arguments (s float32 (d_in,)); also returns the layout's kernel."""
    if half_params is not None and not isinstance(half_params, bool):
        raise ValueError(f"half_params must be True, False or None, got {half_params!r}")
    name = select_layout(spec, tuple(w.shape), w.device.type, w.dtype, layout, strict)
    kernel = get_kernel(name, w.device.type)
    kw = {}
    if half_params is not None and getattr(kernel, "half_params", False):
        kw["half_params"] = half_params
    elif half_params:
        raise ValueError(f"layout {name!r} keeps float32 scale / zero; half_params=True needs a cpu_q* layout "
                         f"(the CPU kernels)")
    reuse = (out is not None and out.layout == name and out.shape == tuple(w.shape) and out.bits == spec.bits
             and out.group_size == spec.group_size and out.device == w.device and hasattr(kernel, "pack_into"))
    if reuse:
        return kernel.pack_into(out, w, s, spec, b, a, **kw), kernel
    return kernel.pack(w, s, spec, b, a, **kw), kernel


@dataclass(frozen=True, eq=False)
class PackedLinear:
    """A packed weight bound to its kernel and to the other arguments of its product.

    ``lin(x)`` is ``y = deq(packed) @ (x / s) + B (A x) + bias`` for x (..., d_in) -> (..., d_out) in
    x's dtype, exactly :func:`packed_linear` of the same arguments (no per-call kernel lookup).
    Built by :func:`pack_linear`.  Copies and pickles rebind the ``decoder`` to their own tensors.

    Args:
        packed: the packed weight; kernel: its layout's kernel (:func:`get_kernel`).
        s: float32 (d_in,) scale used when packing; bias: (d_out,) or None.
        b, a: low-rank factors (d_out, r), (r, d_in) added by the product, contiguous float32, or None.
        decoder: the kernel's bound product (its optional ``decoder``): returns y for the inputs it takes
            (one token per sequence) and None for any other; None when the kernel has none or it was not asked for.
        reference_weight: ``dequantize_packed(packed)`` when the product is the plain dequantize-then-matmul
            oracle (:func:`ttq.kernels.reference.reference_linear`) on these packed weights; else None.
    """

    packed: PackedWeight
    kernel: Kernel
    s: torch.Tensor
    bias: torch.Tensor | None = None
    b: torch.Tensor | None = None
    a: torch.Tensor | None = None
    decoder: Callable[[torch.Tensor], torch.Tensor | None] | None = None
    reference_weight: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.decoder is not None and not torch.compiler.is_compiling():  # compiled: the kernel's ops instead
            y = self.decoder(x)  # None for inputs it does not take (prefill-sized, other devices)
            if y is not None:
                return y
        d_in = self.packed.shape[1]
        if x.shape[-1] != d_in:
            raise ValueError(f"input has {x.shape[-1]} features, packed weight expects {d_in} "
                             f"(shape {self.packed.shape})")
        if self.reference_weight is not None:
            from ttq.kernels.reference import reference_linear

            return reference_linear(x, self.packed, self.s, self.bias, self.b, self.a, weight=self.reference_weight)
        return self.kernel.linear(x, self.packed, self.s, self.bias, self.b, self.a)

    def nbytes(self) -> int:
        """Bytes one product reads: the packed weight's, the scale ``s``, the low-rank factors and the bias."""
        extra = [t for t in (self.s, self.bias, self.b, self.a) if t is not None]
        return self.packed.nbytes() + sum(t.numel() * t.element_size() for t in extra)

    def __reduce__(self):  # the bound decoder holds this object's tensors: a copy binds its own
        return _bind, (self.packed, self.s, self.bias, self.b, self.a, self.decoder is not None,
                       self.reference_weight is not None)


def _bind(
    packed: PackedWeight, s: torch.Tensor, bias: torch.Tensor | None, b: torch.Tensor | None,
    a: torch.Tensor | None, decoder: bool, reference: bool, kernel: Kernel | None = None,
) -> PackedLinear:
    """:class:`PackedLinear` of ``packed`` (its kernel looked up unless given)."""
    kernel = kernel if kernel is not None else get_kernel(packed.layout, packed.device.type)
    ref = None
    if reference:
        from ttq.kernels.reference import dequantize_packed

        ref = dequantize_packed(packed)  # (d_out, d_in) float32, once per packing
    bind = getattr(kernel, "decoder", None) if decoder and not reference else None
    dec = bind(packed, s, bias, b, a) if bind is not None else None
    return PackedLinear(packed, kernel, s, bias, b, a, dec, ref)


def pack_linear(
    w_res: torch.Tensor,
    s: torch.Tensor,
    spec: QuantSpec,
    bias: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
    layout: str | None = None,
    strict: bool = False,
    out: PackedWeight | None = None,
    half_params: bool | None = None,
    decoder: bool = True,
    reference: bool = False,
) -> PackedLinear:
    """Pack ``w_res diag(s)`` and bind its product: one crossing of the kernel layer per packing.

    Args:
        w_res: the weight to quantize (d_out, d_in): ``W`` when r = 0, else the residual ``W - B A``
            already subtracted (a layer caches it).
        s: (d_in,) positive scale; spec: the format.
        bias: (d_out,) or None; b, a: low-rank factors (d_out, r), (r, d_in) that the product adds back
            (``B (A x)``), contiguous float32 (else kernels copy them every call), or None.
        layout, strict, out, half_params: as for :func:`pack_ttq`.
        decoder: bind the kernel's one-token ``decoder`` too (prompt mode's decode steps).
        reference: the product is the dequantize-then-matmul oracle on the packed weights (its weight
            dequantized once here); no decoder.
    Returns:
        a :class:`PackedLinear`.
    """
    s = _check_ttq_args(w_res, s, b, a, bias)
    packed, kernel = _pack(w_res, s, spec, None, None, layout, strict, out, half_params)
    return _bind(packed, s, bias, b, a, decoder, reference, kernel)


def packed_linear(
    x: torch.Tensor,
    packed: PackedWeight,
    s: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = deq(packed) @ (x / s) + B (A x) + bias``.

    Args:
        x: (..., d_in) activations (float32 / bfloat16 / float16).
        packed: from :func:`pack_ttq`.
        s: the scale used when packing (d_in,), or None (ones).
        bias: (d_out,) or None.
        b, a: low-rank factors (d_out, r), (r, d_in) or None; pass them contiguous float32
            (e.g. cached ``.float().contiguous()``), else kernels copy them on every call.
    Returns:
        (..., d_out) in x's dtype.
    """
    d_out, d_in = packed.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"input has {x.shape[-1]} features, packed weight expects {d_in} (shape {packed.shape})")
    if s is not None and s.shape != (d_in,):
        raise ValueError(f"scale s has shape {tuple(s.shape)}, expected ({d_in},)")
    if bias is not None and bias.shape != (d_out,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({d_out},)")
    if (b is None) != (a is None) or (b is not None and (b.shape[0] != d_out or a.shape[1] != d_in)):
        raise ValueError(f"low-rank factors must be b (d_out={d_out}, r) and a (r, d_in={d_in}) or both None")
    return get_kernel(packed.layout, x.device.type).linear(x, packed, s, bias, b, a)


def unpack(packed: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 (d_out, d_in), scale f32 (d_out, n_groups), zero f32 (d_out, n_groups)) of any layout."""
    return get_kernel(packed.layout, packed.device.type).unpack(packed)


# ---------------------------------------------------------------- precomputed codes
# A method that chooses codes, scale or zero itself (a clipping search, GPTQ's error feedback:
# :mod:`ttq.methods.refine`) packs them here instead of letting the kernel quantize ``W diag(s)``.
# The bit packing of each built-in layout, in plain PyTorch from the module table (a kernel may
# provide its own ``pack_codes(codes, scale, zero, spec, half_params) -> PackedWeight``).


def _tiles(codes: torch.Tensor, width: int) -> torch.Tensor:
    """(d_out, d_in) uint8 -> (d_out, n_tiles, width // 16, 16) int32, columns past d_in holding 0."""
    d_out, d_in = codes.shape
    pad = (-d_in) % width
    c = torch.nn.functional.pad(codes, (0, pad)) if pad else codes
    return c.to(torch.int32).reshape(d_out, -1, width // 16, 16)


def _pack_q8(codes: torch.Tensor) -> torch.Tensor:  # (d_out, 16 * ceil(d_in / 16))
    return _tiles(codes, 16).reshape(codes.shape[0], -1).to(torch.uint8)


def _pack_q4(codes: torch.Tensor) -> torch.Tensor:  # (d_out, 16 * ceil(d_in / 32)): low nibble col j, high j + 16
    t = _tiles(codes, 32)  # (d_out, n, 2, 16)
    return (t[:, :, 0] | (t[:, :, 1] << 4)).reshape(codes.shape[0], -1).to(torch.uint8)


def _pack_q2(codes: torch.Tensor) -> torch.Tensor:  # (d_out, 16 * ceil(d_in / 64)): col 16 k + j in bits 2k..2k+1
    t = _tiles(codes, 64)  # (d_out, n, 4, 16)
    byte = t[:, :, 0] | (t[:, :, 1] << 2) | (t[:, :, 2] << 4) | (t[:, :, 3] << 6)  # (d_out, n, 16)
    return byte.reshape(codes.shape[0], -1).to(torch.uint8)


def _pack_q3(codes: torch.Tensor) -> torch.Tensor:  # (d_out, 48 * ceil(d_in / 128)): 16 little-endian 24-bit lanes
    t = _tiles(codes, 128)  # (d_out, n, 8, 16)
    lane = sum(t[:, :, k] << (3 * k) for k in range(8))  # (d_out, n, 16) 24-bit
    by = torch.stack([lane & 255, (lane >> 8) & 255, (lane >> 16) & 255], dim=-1)  # (d_out, n, 16, 3)
    return by.reshape(codes.shape[0], -1).to(torch.uint8)


CODE_PACKERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    REFERENCE_LAYOUT: lambda c: c.contiguous(),
    "cpu_q8": _pack_q8, "cpu_q8_i8": _pack_q8, "cpu_q4": _pack_q4, "cpu_q4_i8": _pack_q4,
    "cpu_q2": _pack_q2, "cpu_q3": _pack_q3,
}
HALF_LAYOUTS = ("cpu_q2", "cpu_q3", "cpu_q4", "cpu_q8", "cpu_q4_i8", "cpu_q8_i8")  # may store float16 scale / zero


def _fits_half(t: torch.Tensor) -> bool:
    """Every value 0 or within float16's normal range (the kernels' rule for storing float16 parameters)."""
    a = t.abs()
    return bool(((a == 0) | ((a >= 6.103515625e-05) & (a <= 65504.0))).all())


HALF_ZERO_SHIFT = 1 / 8  # the most of a step float16 rounding may move a precomputed code's weight (pack_codes)


def _half_keeps_grid(scale: torch.Tensor, zero: torch.Tensor) -> bool:
    """Whether rounding ``zero`` to float16 (at most 2^-11 |zero|) moves every group's grid by at most
    :data:`HALF_ZERO_SHIFT` of its step: precomputed codes are not re-chosen against the rounded values, so a
    group far from 0 (|zero| >> its range) would otherwise move by most of a step.  A constant group (scale 0)
    moves by 2^-11 of its value, as in :func:`pack_ttq`."""
    return bool(((scale == 0) | (zero.abs() * 2.0 ** -11 <= HALF_ZERO_SHIFT * scale.abs())).all())


def pack_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    spec: QuantSpec,
    layout: str | None = None,
    strict: bool = False,
    half_params: bool | None = None,
) -> PackedWeight:
    """Pack precomputed codes (of ``(W - B A) diag(s)``) into a named layout without re-quantizing.

    Args:
        codes: uint8 (d_out, d_in) in [0, 2^bits - 1]; scale, zero: (d_out, n_groups) float32 (the
            format's ``dequantize(codes, scale, zero)`` is the weight in the scaled domain).
        spec: the format (bits, group_size, fmt).
        layout, strict: as for :func:`pack_ttq` (layout None = the best for the codes' device); a layout
            with no code packer (its kernel's ``pack_codes`` or :data:`CODE_PACKERS`) falls back to ``u8``
            with one logged line (``ValueError`` with ``strict`` or an explicit layout).
        half_params: float16 scale / zero in the ``cpu_q*`` layouts when every value fits
            float16's normal range (as :func:`pack_ttq`) and the rounding moves no group's grid by more than
            :data:`HALF_ZERO_SHIFT` of a step (these codes are kept as given); None = the option ``half_params``.
    Returns:
        a :class:`PackedWeight` whose unpacked codes, scale and zero are the given ones.
    """
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise ValueError(f"codes must be a 2-D uint8 tensor (d_out, d_in), got {codes.dtype} {tuple(codes.shape)}")
    shape = tuple(codes.shape)
    n = num_groups(shape[1], spec.group_size)
    if scale.shape != (shape[0], n) or zero.shape != (shape[0], n):
        raise ValueError(f"scale and zero must be ({shape[0]}, {n}) for codes {shape} at group_size "
                         f"{spec.group_size}, got {tuple(scale.shape)} and {tuple(zero.shape)}")
    name = select_layout(spec, shape, codes.device.type, torch.float32, layout, strict)
    kernel = get_kernel(name, codes.device.type)
    own = getattr(kernel, "pack_codes", None)
    if own is not None:
        return own(codes, scale, zero, spec, half_params)
    packer = CODE_PACKERS.get(name)
    if packer is None:
        if strict or layout is not None:
            raise ValueError(f"layout {name!r} has no packer for precomputed codes")
        log_once(f"layout {name!r} has no packer for precomputed codes: packed weights use the reference layout 'u8'")
        name, packer = REFERENCE_LAYOUT, CODE_PACKERS[REFERENCE_LAYOUT]
    sc, zr = scale.float().contiguous(), zero.float().contiguous()
    if name in HALF_LAYOUTS:
        if wants_half(half_params) and _fits_half(sc) and _fits_half(zr) and _half_keeps_grid(sc, zr):
            sc, zr = sc.half(), zr.half()
    elif half_params:
        raise ValueError(f"layout {name!r} keeps float32 scale / zero; half_params=True needs a cpu_q* layout")
    return PackedWeight(name, spec.bits, spec.group_size, shape, packer(codes), sc, zr, getattr(spec, "fmt", "int"))


def pack_codes_linear(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    s: torch.Tensor,
    spec: QuantSpec,
    bias: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
    layout: str | None = None,
    strict: bool = False,
    half_params: bool | None = None,
    decoder: bool = True,
    reference: bool = False,
) -> PackedLinear:
    """:func:`pack_linear` for precomputed codes: :func:`pack_codes`, then the product bound
    (``y = deq(packed) @ (x / s) + B (A x) + bias``); arguments as for those two functions."""
    _check_product_args(tuple(codes.shape), s, b, a, bias)
    packed = pack_codes(codes, scale, zero, spec, layout, strict, half_params)
    return _bind(packed, s.float(), bias, b, a, decoder, reference)
