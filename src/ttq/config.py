"""Method configurations: one frozen dataclass per method, registered once.

A config says *what* to do to every matched linear layer; the walker
(:func:`ttq.patch.quantize_`) says *where*.  ``config_to_dict`` /
``config_from_dict`` give a JSON-able round trip.

Every field is type-checked against its annotation (:mod:`ttq.typecheck`) before the
method's own range checks: ``"false"`` for a bool or ``3.5`` for an int is a
:class:`~ttq.errors.ConfigError` naming the method, the field, the value and the type.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ttq.errors import ConfigError
from ttq.formats.affine import QuantSpec
from ttq.methods.scaling import ScaleSpec
from ttq.typecheck import check_types, check_values

METHODS: dict[str, type] = {}


def register_method(cls: type) -> type:
    """Class decorator: make ``cls`` (a frozen dataclass with a ``name``) known by name."""
    METHODS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class CalibSpec:
    """Calibration data for static methods.

    Args:
        dataset: one of ``ttq.data.CALIB_DATASETS`` (wikitext2 / ptb / c4).
        n_tokens: calibration length in tokens (the paper uses up to 2**17).
        seqlen: window length of the calibration forwards.
        seed: seed of the random window draw.
    """

    dataset: str = "c4"
    n_tokens: int = 2**17
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        if self.n_tokens <= 0:
            raise ValueError(f"calibration n_tokens must be a positive integer, got {self.n_tokens!r}")
        if self.seqlen <= 0:
            raise ValueError(f"calibration seqlen must be a positive integer, got {self.seqlen!r}")


@register_method
@dataclass(frozen=True)
class RTNConfig:
    """Round-to-nearest (Appendix B)."""

    name: ClassVar[str] = "rtn"
    needs_calibration: ClassVar[bool] = False
    quant: QuantSpec = field(default_factory=QuantSpec)

    def __post_init__(self) -> None:
        check_types(self, f"method {self.name!r}")


@register_method
@dataclass(frozen=True)
class AWQConfig:
    """Static AWQ with l_p diagonal; alpha by line search on calibration data (Appendix C)."""

    name: ClassVar[str] = "awq"
    needs_calibration: ClassVar[bool] = True
    quant: QuantSpec = field(default_factory=QuantSpec)
    scale: ScaleSpec = field(default_factory=ScaleSpec)
    calib: CalibSpec = field(default_factory=CalibSpec)
    alphas: tuple[float, ...] = tuple(i / 20 for i in range(21))

    def __post_init__(self) -> None:
        check_types(self, f"method {self.name!r}")
        if not self.alphas or not all(0.0 <= a <= 4.0 for a in self.alphas):
            raise ValueError(f"alphas must be a non-empty sequence of numbers in [0, 4], got {self.alphas!r}")
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))  # a list would be unhashable


@register_method
@dataclass(frozen=True)
class TTQConfig:
    """Test-time quantization (Section 2), optionally with a static rank-r SVD part."""

    name: ClassVar[str] = "ttq"
    needs_calibration: ClassVar[bool] = False
    quant: QuantSpec = field(default_factory=QuantSpec)
    scale: ScaleSpec = field(default_factory=ScaleSpec)
    rank: int = 0

    def __post_init__(self) -> None:
        check_types(self, f"method {self.name!r}")
        _check_rank(self.rank)


@register_method
@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ (Frantar et al.; Appendix C): Hessian from calibration, blockwise error feedback.

    ``scale`` (optional) runs GPTQ on ``W diag(s)`` with the calibration l_p diagonal ``s``
    (AWQ/TTQ scaling with a fixed alpha) and ``diag(s)^-1 H diag(s)^-1``.
    ``sequential`` takes block ``i``'s Hessians from the outputs of the already quantized
    blocks ``0..i-1`` (reference GPTQ; :mod:`ttq.patch.sequential`): ``quantize_`` then
    needs the calibration token windows, not per-layer statistics.
    """

    name: ClassVar[str] = "gptq"
    needs_calibration: ClassVar[bool] = True
    quant: QuantSpec = field(default_factory=QuantSpec)
    calib: CalibSpec = field(default_factory=CalibSpec)
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    scale: ScaleSpec | None = None
    sequential: bool = field(default=False, metadata={"omit_default": True})

    def __post_init__(self) -> None:
        check_types(self, f"method {self.name!r}")
        if not 0.0 < self.damp <= 1.0:
            raise ValueError(f"damp (relative Hessian damping) must be in (0, 1], got {self.damp!r}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")


@register_method
@dataclass(frozen=True)
class AWPConfig:
    """AWP (Liu et al.; eq. 18): projected gradient descent on ``tr[E C_lam E^T]``.

    ``shrink`` is the lam of eq. 13, ``step`` sets ``mu = step / ||C_lam||_2``; the
    iteration starts from the scaled QDQ with ``scale`` (alpha = 0: plain RTN).
    ``online=True`` takes ``C_lam`` and ``s`` from each forward's own tokens (no calibration).
    """

    name: ClassVar[str] = "awp"
    quant: QuantSpec = field(default_factory=QuantSpec)
    scale: ScaleSpec = field(default_factory=ScaleSpec)
    iters: int = 10
    step: float = 1.0
    shrink: float = 0.01
    fixed_grid: bool = True
    online: bool = False
    calib: CalibSpec = field(default_factory=CalibSpec)

    def __post_init__(self) -> None:
        check_types(self, f"method {self.name!r}")
        if self.iters < 0:
            raise ValueError(f"iters must be a non-negative integer, got {self.iters!r}")
        if not self.step > 0:
            raise ValueError(f"step (mu * ||C||_2) must be positive, got {self.step!r}")
        if not 0.0 <= self.shrink <= 1.0:
            raise ValueError(f"shrink (lam of eq. 13) must be in [0, 1], got {self.shrink!r}")

    @property
    def needs_calibration(self) -> bool:
        return not self.online


_NESTED = {"quant": QuantSpec, "scale": ScaleSpec, "calib": CalibSpec}


def config_to_dict(config: Any) -> dict:
    """``{"method": name, **fields}``, JSON-able.

    A field declared with ``metadata={"omit_default": True}`` is left out while it has its
    default, so adding such a field keeps the dicts (and result-cache keys) of existing configs.
    """
    d = dataclasses.asdict(config)
    for f in dataclasses.fields(config):
        if f.metadata.get("omit_default") and d[f.name] == f.default:
            del d[f.name]
    return {"method": config.name, **d}


def config_from_dict(d: dict) -> Any:
    """Inverse of :func:`config_to_dict`.

    Every value is checked against its field's annotation first (nested spec dicts too), so
    ``{"quant": {"symmetric": "false"}}`` is a :class:`ConfigError`, never a truthy string.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a dict (JSON object) with a 'method', got {d!r}")
    d = dict(d)
    name = d.pop("method", None)
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    where = f"method {name!r}"
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v = d.pop(f.name)
        if f.name in _NESTED and isinstance(v, dict):
            spec_cls = _NESTED[f.name]
            known = {nf.name for nf in dataclasses.fields(spec_cls)}
            if set(v) - known:
                raise ConfigError(
                    f"unknown field(s) in {f.name!r} of {where}: {', '.join(sorted(set(v) - known))}; "
                    f"allowed: {', '.join(sorted(known))}"
                )
            check_values(spec_cls, v, where, prefix=f"{f.name}.")
            v = spec_cls(**v)
        kwargs[f.name] = tuple(v) if isinstance(v, list) else v
    if d:
        raise ConfigError(f"unknown field(s) for {where}: {', '.join(sorted(d))}")
    return cls(**kwargs)  # its __post_init__ checks the types of the top-level fields


# ---------------------------------------------------------------- Appendix E: low-rank variants, pruning, online low-rank

LOWRANK_INITS = ("svd", "asvd", "alternating")
FACTOR_WHICH = ("A", "B", "both")
PRUNE_ORDERS = ("prune_then_quantize", "quantize_then_mask")
PRUNE_SCORES = ("activation", "magnitude")
ONLINE_RULES = ("oja", "isvd", "asvd")


def _check_choice(what: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def _check_rank(rank: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be a non-negative integer, got {rank!r}")


@register_method
@dataclass(frozen=True)
class TTQLowRankConfig:
    """TTQ with a static rank-r part from SVD, ASVD or alternating eqs. 34-35 (Appendix E).

    ``init="asvd"`` uses ``svd_r[W C^(1/2)] C^(-1/2)`` with the calibration correlation
    shrunk by ``asvd_lam`` (``asvd_diagonal``: its diagonal only); ``"alternating"``
    runs ``iters`` steps of eqs. 34-35 (with the calibration scale when calibration is
    given, plain Q otherwise).  The factors may then be pruned (``factor_prune`` sparsity
    per row, ``factor_prune_score`` magnitude or activation-aware) and RTN-quantized
    (``factor_quant``), each on A, B or both; TTQ quantizes ``W - B A`` of the final factors.
    """

    name: ClassVar[str] = "ttq_lowrank"
    quant: QuantSpec = field(default_factory=QuantSpec)
    scale: ScaleSpec = field(default_factory=ScaleSpec)
    rank: int = 16
    init: str = "svd"
    iters: int = 5
    asvd_lam: float = 0.1
    asvd_diagonal: bool = False
    factor_quant: QuantSpec | None = None
    factor_quant_which: str = "both"
    factor_prune: float = 0.0
    factor_prune_which: str = "both"
    factor_prune_score: str = "magnitude"
    calib: CalibSpec = field(default_factory=CalibSpec)

    def __post_init__(self) -> None:
        from ttq.methods.pruning import check_sparsity

        check_types(self, f"method {self.name!r}")
        _check_rank(self.rank)
        _check_choice("init", self.init, LOWRANK_INITS)
        _check_choice("factor_quant_which", self.factor_quant_which, FACTOR_WHICH)
        _check_choice("factor_prune_which", self.factor_prune_which, FACTOR_WHICH)
        _check_choice("factor_prune_score", self.factor_prune_score, PRUNE_SCORES)
        if self.iters < 0:
            raise ValueError(f"iters must be a non-negative integer, got {self.iters!r}")
        if not 0.0 <= self.asvd_lam <= 1.0:
            raise ValueError(f"asvd_lam (shrinkage of the ASVD correlation) must be in [0, 1], got {self.asvd_lam!r}")
        check_sparsity(self.factor_prune)

    @property
    def needs_calibration(self) -> bool:
        return self.init == "asvd" or (self.factor_prune > 0 and self.factor_prune_score == "activation")


@register_method
@dataclass(frozen=True)
class PruneConfig:
    """Test-time activation-aware pruning (mu-MoE / Wanda), optionally followed by TTQ.

    ``sparsity`` in [0, 1) per output row, or ``n_m = (N, M)`` (keep N of every M input
    columns; then ``sparsity`` is ``1 - N/M``).  ``quant`` None prunes only; otherwise the
    kept weights are test-time quantized with ``scale`` in the given ``order``.
    """

    name: ClassVar[str] = "prune"
    needs_calibration: ClassVar[bool] = False
    sparsity: float = 0.5
    n_m: tuple[int, int] | None = None
    quant: QuantSpec | None = None
    scale: ScaleSpec = field(default_factory=ScaleSpec)
    order: str = "prune_then_quantize"
    score: str = "activation"

    def __post_init__(self) -> None:
        from ttq.methods.pruning import check_n_m, check_sparsity

        check_types(self, f"method {self.name!r}")
        _check_choice("order", self.order, PRUNE_ORDERS)
        _check_choice("score", self.score, PRUNE_SCORES)
        check_sparsity(self.sparsity)
        if self.n_m is not None:
            check_n_m(tuple(self.n_m))
            implied = 1.0 - self.n_m[0] / self.n_m[1]
            if self.sparsity not in (0.5, implied):  # 0.5 is the default, left untouched
                raise ValueError(f"n_m={self.n_m[0]}:{self.n_m[1]} implies sparsity {implied}, got sparsity={self.sparsity}; give one of them")
            object.__setattr__(self, "n_m", tuple(self.n_m))
            object.__setattr__(self, "sparsity", implied)


@register_method
@dataclass(frozen=True)
class OnlineLowRankTTQConfig:
    """TTQ with low-rank factors ``B = W U``, ``A = U^T`` adapted online (test-time decomposition).

    ``rule="oja"``: Oja's subspace rule with step ``lr`` (one step per ``chunk`` tokens, the
    whole sequence when None); ``"isvd"``: Brand's incremental SVD with forgetting ``decay``;
    ``"asvd"``: ``B A = svd_r[W S] S^-1`` with the prompt's diagonal ``S = C_lam^(1/2)``, tracked by
    ``power_iters`` warm-started power steps per forward (0: exact SVD per forward; ``B = W S U``,
    ``A = U^T S^-1``).
    """

    name: ClassVar[str] = "ttq_online"
    needs_calibration: ClassVar[bool] = False
    quant: QuantSpec = field(default_factory=QuantSpec)
    scale: ScaleSpec = field(default_factory=ScaleSpec)
    rank: int = 16
    rule: str = "oja"
    lr: float = 1.0
    decay: float = 1.0
    chunk: int | None = None
    power_iters: int = 1

    def __post_init__(self) -> None:
        check_types(self, f"method {self.name!r}")
        _check_rank(self.rank)
        _check_choice("rule", self.rule, ONLINE_RULES)
        if self.power_iters < 0:
            raise ValueError(f"power_iters must be a non-negative integer (0 = exact SVD), got {self.power_iters!r}")
        if not self.lr > 0:
            raise ValueError(f"lr (Oja step) must be positive, got {self.lr!r}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay (forgetting factor) must be in (0, 1], got {self.decay!r}")
        if self.chunk is not None and self.chunk <= 0:
            raise ValueError(f"chunk must be a positive number of tokens or None, got {self.chunk!r}")


_NESTED["factor_quant"] = QuantSpec  # TTQLowRankConfig's optional factor format
