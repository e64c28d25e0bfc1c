"""On-the-fly refinements of TTQ (issue 16): searches that use only the current sequence's tokens.

Plain TTQ (TTQ paper, Section 2) quantizes ``Q[(W - B A) diag(s)] diag(s)^-1`` with ``s`` from the
tokens' diagonal statistic at a constant ``alpha`` and a static SVD part ``B A``.  Each refinement
below replaces one constant by a choice made from the same tokens ``X`` (d_in, T), scored by the
layer's output error (eq. 2), ``L = tr[dW X X^T dW^T]`` with ``dW = W - W_hat``:

* ``score="diag"`` -- its diagonal part ``sum_i ||X_i||^2 sum_o dW_oi^2`` (AWQ's approximation; one
  pass over the weight, from the per-channel statistic ``h_i = ||X_i||^2`` only);
* ``score="exact"`` -- ``||dW X_m||^2`` on ``m = score_tokens`` evenly spaced tokens ``X_m``.

==================  ========================================================================
refinement          what it chooses (per layer, per sequence)
==================  ========================================================================
``alpha_grid``      ``alpha`` of :class:`~ttq.methods.scaling.ScaleSpec` by line search over the
                    grid (``s`` of each candidate from the same statistic; RTN of each candidate
                    scored), :func:`search_alpha`
``clip_grid``       per group a shrink ``beta`` of the group's range (AWQ's clipping step:
                    ``max -> beta max``, ``min -> beta min``, i.e. ``S -> beta S``, ``Z -> beta Z``);
                    ``beta = 1`` is always a candidate; :func:`search_clip`, :func:`apply_clip`
``prompt_lowrank``  ``B A = svd_r[W diag(s)] diag(s)^-1`` (the rank-r part of the *scaled* weight,
                    with ``s`` at the config's alpha) instead of the static ``svd_r[W]``,
                    :func:`prompt_factors`
``gptq``            GPTQ's error feedback (:func:`ttq.methods.gptq.gptq_quantize`) with the
                    sequence's own ``H = 2 X X^T / T``, damped, on ``(W - B A) diag(s)``,
                    :func:`gptq_codes`
``hqq``             HQQ's half-quadratic optimisation of each group's zero-point (the ``hqq``
                    package, :func:`ttq.methods.hqq.hqq_quantize`) on ``(W - B A) diag(s)``: its
                    l_p error is measured on the scaled weight, so ``s`` makes it activation-aware
==================  ========================================================================

They compose in this order (:func:`refine_quantize`): the low-rank part (at the config's alpha),
then the alpha search on its residual, then either the clipping search or GPTQ at the chosen
``s``, or HQQ.  ``clip_grid``, ``gptq`` and ``hqq`` exclude each other (each chooses the codes).  Every search returns plain data (the chosen alpha, the
per-group ``beta``, the candidates' errors) and a separate step applies it.

A sequence of one token is valid for every refinement: ``h`` and the sample are that token, and
GPTQ's Hessian is rank one, made invertible by its damping ``damp * mean(diag H) I``.  Channels
that no token of the sequence used (``h_i = 0``) keep their weights under GPTQ (their Hessian
diagonal is floored at ``1e-6 mean(diag H)``, where GPTQ alone would zero the column).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ttq.errors import ConfigError
from ttq.formats.affine import QuantSpec, dequantize, group_params, quantize
from ttq.formats.spec import effective_group_size
from ttq.methods.gptq import gptq_hessian, gptq_quantize
from ttq.methods.lowrank import residual, svd_factors
from ttq.methods.scaling import ChannelStats, ScaleSpec, input_scale

SCORES = ("diag", "exact")
CLIP_FORMATS = ("int",)  # shrinking S and Z together is a range clip only for the affine integer format


@dataclass(frozen=True)
class RefineSpec:
    """Which on-the-fly refinements a TTQ layer runs (see the module table).

    Args:
        alpha_grid: candidate alphas in [0, 4] (e.g. ``(0, 0.25, 0.5, 0.75, 1)``); None = the
            config's constant alpha.
        clip_grid: candidate range shrinks ``beta`` in (0, 1] (1 is always tried); None = no clipping.
        prompt_lowrank: the rank-r part from ``W diag(s)`` of this sequence (needs rank > 0).
        gptq: GPTQ error feedback with this sequence's ``X X^T``.
        hqq: HQQ's zero-point optimiser on the scaled weight (``pip install 'ttq[hqq]'``).
        damp: GPTQ's relative damping (0, 1].
        score: ``"diag"`` or ``"exact"`` (module docstring) for the alpha and clipping searches.
        score_tokens: tokens in the ``"exact"`` score's sample (>= 1).
        svd_exact: the prompt-aware SVD: randomized (False; ``torch.svd_lowrank``, fixed seed),
            exact (True) or by size (None: :func:`ttq.methods.lowrank.svd_factors`' rule).
        joint: with both grids, score each alpha after its own clipping search (one clipping search per
            alpha) instead of choosing alpha on unclipped codes first; diag score only.
    """

    alpha_grid: tuple[float, ...] | None = None
    clip_grid: tuple[float, ...] | None = None
    prompt_lowrank: bool = False
    gptq: bool = False
    damp: float = 0.01
    score: str = "diag"
    score_tokens: int = 64
    svd_exact: bool | None = False
    hqq: bool = False
    joint: bool = False

    def __post_init__(self) -> None:
        from ttq.typecheck import check_types

        check_types(self, "refine")
        for name in ("alpha_grid", "clip_grid"):  # JSON lists -> tuples (hashable, frozen)
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(v))
        if self.alpha_grid is not None:
            _check_grid("alpha_grid", self.alpha_grid, lambda a: 0.0 <= a <= 4.0, "in [0, 4] (ScaleSpec's range)")
        if self.clip_grid is not None:
            _check_grid("clip_grid", self.clip_grid, lambda b: 0.0 < b <= 1.0, "in (0, 1] (a shrink of the range)")
        if not 0.0 < self.damp <= 1.0:
            raise ConfigError(f"refine: damp (GPTQ's relative damping) must be in (0, 1], got {self.damp!r}")
        if self.score not in SCORES:
            raise ConfigError(f"refine: score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.score_tokens < 1:
            raise ConfigError(f"refine: score_tokens must be a positive integer, got {self.score_tokens!r}")
        if self.gptq and self.clip_grid is not None:
            raise ConfigError("refine: clip_grid and gptq exclude each other (GPTQ takes each group's range from "
                              "the weights it has already updated); choose one")
        if self.joint and (self.alpha_grid is None or self.clip_grid is None or self.score != "diag"):
            raise ConfigError("refine: joint scores each alpha after its clipping search: it needs alpha_grid and "
                              "clip_grid and the diag score")
        if self.hqq and (self.gptq or self.clip_grid is not None):
            raise ConfigError("refine: hqq excludes gptq and clip_grid (each of them chooses the codes); choose one")

    @property
    def needs_gram(self) -> bool:
        """Whether the sequence's ``X X^T`` is collected (GPTQ)."""
        return self.gptq

    @property
    def needs_sample(self) -> bool:
        """Whether a token sample is kept (the exact score of a search)."""
        return self.score == "exact" and (self.alpha_grid is not None or self.clip_grid is not None)


def _check_grid(name: str, grid: tuple[float, ...], ok, allowed: str) -> None:
    if len(grid) == 0:
        raise ConfigError(f"refine: {name} is empty; give at least one value {allowed}, or null for none")
    bad = [v for v in grid if math.isnan(v) or not ok(float(v))]
    if bad:
        raise ConfigError(f"refine: every {name} value must be {allowed}, got {bad}")


def check_refine(refine: RefineSpec | None, spec: QuantSpec, rank: int) -> None:
    """Refuse refinements the format or the rank cannot carry (``ConfigError``)."""
    if refine is None:
        return
    if refine.clip_grid is not None and spec.fmt not in CLIP_FORMATS:
        raise ConfigError(f"refine: clip_grid shrinks the integer format's per-group (min, max); format "
                          f"{spec.fmt!r} has no zero point / its scales are constrained; use fmt='int' or drop clip_grid")
    if refine.prompt_lowrank and rank == 0:
        raise ConfigError("refine: prompt_lowrank replaces the rank-r SVD part, so it needs rank > 0")
    if refine.hqq:
        from ttq.methods.hqq import HQQ_BITS, hqq_quantizer

        if spec.fmt != "int" or spec.symmetric or spec.nu != 1.0 or spec.bits not in HQQ_BITS:
            raise ConfigError(f"refine: hqq produces the asymmetric integer format at {', '.join(map(str, HQQ_BITS))} "
                              f"bits (fmt='int', symmetric=False, nu=1); got fmt={spec.fmt!r}, bits={spec.bits}, "
                              f"symmetric={spec.symmetric}, nu={spec.nu}")
        hqq_quantizer()  # MissingDependency now, not at the first forward


# ---------------------------------------------------------------- the sequence's statistics


@dataclass
class TokenStats:
    """What the searches read from a sequence's tokens ``X`` (T tokens of d_in channels).

    Args:
        sq: (d_in,) float32 ``h_i = sum_t x_ti^2`` (the diagonal of ``X X^T``).
        n_tokens: T.
        gram: (d_in, d_in) float32 ``X X^T``, or None (only GPTQ needs it).
        sample: (m, d_in) float32 evenly spaced tokens for the exact score, or None.
    """

    sq: torch.Tensor
    n_tokens: int
    gram: torch.Tensor | None = None
    sample: torch.Tensor | None = None

    @classmethod
    def from_activations(cls, x: torch.Tensor, refine: RefineSpec) -> TokenStats:
        """Args: x (..., d_in) activations, every leading dim a token (at least one)."""
        if x.numel() == 0:
            raise ValueError(f"refinement statistics need at least one token, got input of shape {tuple(x.shape)}")
        x2 = x.reshape(-1, x.shape[-1]).float()  # (..., d_in) -> (T, d_in)
        gram = x2.T @ x2 if refine.needs_gram else None  # (d_in, T) @ (T, d_in) -> (d_in, d_in)
        sample = _even_sample(x2, refine.score_tokens) if refine.needs_sample else None  # (m, d_in)
        return cls(x2.square().sum(0), x2.shape[0], gram, sample)

    def merge(self, other: TokenStats, refine: RefineSpec) -> TokenStats:
        """The statistics of both token sets (the sample re-thinned to ``score_tokens``)."""
        gram = self.gram + other.gram if self.gram is not None and other.gram is not None else None
        sample = None
        if self.sample is not None and other.sample is not None:
            sample = _even_sample(torch.cat([self.sample, other.sample]), refine.score_tokens)
        return TokenStats(self.sq + other.sq, self.n_tokens + other.n_tokens, gram, sample)


def _even_sample(x: torch.Tensor, m: int) -> torch.Tensor:
    """``m`` evenly spaced rows of ``x`` (T, d) (all of them when T <= m); deterministic."""
    if x.shape[0] <= m:
        return x.clone()
    idx = torch.linspace(0, x.shape[0] - 1, m, device=x.device).round().long()
    return x[idx]


# ---------------------------------------------------------------- scores


def weighted_error(dw: torch.Tensor, tokens: TokenStats, score: str = "diag") -> float:
    """The output error of a weight error ``dw`` (d_out, d_in): ``sum_i h_i ||dW_:i||^2`` (diag) or
    ``||dW X_m||^2`` (exact, on the sample)."""
    if score == "exact":
        return float((dw @ tokens.sample.T).square().sum())  # (d_out, d_in) @ (d_in, m) -> (d_out, m)
    return float((dw.square().sum(0) * tokens.sq).sum())  # (d_in,) . (d_in,)


def _qdq(w_res: torch.Tensor, s: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``Q[w_res diag(s)] diag(s)^-1`` (d_out, d_in) float32."""
    codes, sc, z = quantize(w_res * s, spec, check=False)
    return dequantize(codes, sc, z, spec.group_size, fmt=spec.fmt) / s


# ---------------------------------------------------------------- 1. alpha


def search_alpha(
    w_res: torch.Tensor, stats: ChannelStats, tokens: TokenStats, spec: QuantSpec, scale: ScaleSpec,
    grid: tuple[float, ...], score: str = "diag",
) -> tuple[float, list[float]]:
    """Line search of ``alpha`` over ``grid`` for ``Q[w_res diag(s_alpha)] diag(s_alpha)^-1``.

    Args:
        w_res: (d_out, d_in) float32 weight to quantize (``W - B A``).
        stats: the statistic ``s`` is computed from (``scale.p``); tokens: the score's statistics.
        spec, scale: format and statistic (its alpha is replaced by each candidate).
        grid: candidate alphas; score: ``"diag"`` or ``"exact"``.
    Returns:
        (the alpha of least error -- the first on ties --, the error of every candidate in grid order).
    """
    from ttq.kernels.cpu_codes import clip_codes

    errors = []
    for alpha in grid:
        s = input_scale(stats, dataclasses.replace(scale, alpha=float(alpha)))  # (d_in,)
        fused = clip_codes(w_res, tokens.sq / s.square(), spec, (1.0,), with_codes=False, s=s) if score == "diag" else None
        if fused is not None:  # one C++ pass: plain quantization and its per-group diagonal error
            errors.append(float(fused[4].double().sum()))
        else:
            errors.append(weighted_error(w_res - _qdq(w_res, s, spec), tokens, score))
    best = min(range(len(grid)), key=errors.__getitem__)
    return float(grid[best]), errors


# ---------------------------------------------------------------- 2. clipping


def _group_sums(e: torch.Tensor, g: int) -> torch.Tensor:
    """(d_out, d_in) -> (d_out, n_groups) sums over each group's columns (a short last group padded by 0)."""
    pad = (-e.shape[1]) % g
    if pad:
        e = torch.nn.functional.pad(e, (0, pad))
    return e.reshape(e.shape[0], -1, g).sum(-1)


def clip_candidates(grid: tuple[float, ...]) -> tuple[float, ...]:
    """The shrinks a clipping search tries, in order: 1 (no shrink) first, then ``grid`` without 1."""
    return (1.0, *[float(b) for b in grid if float(b) != 1.0])


def search_clip(
    v: torch.Tensor, s: torch.Tensor, tokens: TokenStats, spec: QuantSpec, grid: tuple[float, ...],
    score: str = "diag",
) -> torch.Tensor:
    """Per-group range shrink ``beta`` of least output error for the scaled weight ``v = w_res diag(s)``.

    Args:
        v: (d_out, d_in) float32 scaled weight; s: (d_in,) its scale (errors are measured on ``v / s``).
        tokens: the score's statistics; spec: an integer format; grid: shrinks in (0, 1] (1 added).
        score: ``"diag"`` (``sum h_i / s_i^2 (v - v_hat)^2`` per group) or ``"exact"`` (the group's
            own output error on the sample, ``sum_t (sum_{i in group} dW_oi x_ti)^2``).
    Returns:
        beta (d_out, n_groups) float32, each a grid value (1 where no shrink lowers the error).
    """
    d_out, d_in = v.shape
    g = effective_group_size(d_in, spec.group_size)
    sc0, z0 = group_params(v, spec, check=False)  # (d_out, n_groups) each
    cands = clip_candidates(grid)
    best_err = best = None
    for beta in cands:
        codes, _, _ = quantize(v, spec, sc0 * beta, z0 * beta, check=False)
        dw = (v - dequantize(codes, sc0 * beta, z0 * beta, spec.group_size, fmt=spec.fmt)) / s  # (d_out, d_in)
        if score == "exact":
            xs = tokens.sample  # (m, d_in)
            pad = (-d_in) % g
            dwg = torch.nn.functional.pad(dw, (0, pad)).reshape(d_out, -1, g)  # (d_out, n_groups, g)
            xg = torch.nn.functional.pad(xs, (0, pad)).reshape(xs.shape[0], -1, g)  # (m, n_groups, g)
            err = torch.einsum("okg,mkg->okm", dwg, xg).square().sum(-1)  # (d_out, n_groups)
        else:
            err = _group_sums(dw.square() * tokens.sq, g)  # (d_out, n_groups)
        if best is None:
            best_err, best = err, torch.ones_like(err)
        else:
            better = err < best_err  # strict: ties keep the earlier (larger) beta, 1 first
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(best, beta), best)
    return best


def clipped_codes(
    w_res: torch.Tensor, s: torch.Tensor, tokens: TokenStats, spec: QuantSpec, grid: tuple[float, ...],
    score: str = "diag",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The clipping search of ``w_res diag(s)`` and its codes: one C++ pass for the diagonal score
    (:func:`ttq.kernels.cpu_codes.clip_codes`, ``w_res diag(s)`` formed inside), else :func:`search_clip` and
    :func:`apply_clip`.

    Returns:
        (codes, scale, zero, beta, error): error is the C++ pass's per-group diagonal error (d_out, n_groups),
        None from the PyTorch path.
    """
    if score == "diag":
        from ttq.kernels.cpu_codes import clip_codes

        fused = clip_codes(w_res, tokens.sq / s.square(), spec, clip_candidates(grid), s=s)
        if fused is not None:
            return fused
    v = w_res * s  # (d_out, d_in)
    beta = search_clip(v, s, tokens, spec, grid, score)
    return (*apply_clip(v, spec, beta), beta, None)


def apply_clip(v: torch.Tensor, spec: QuantSpec, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes uint8 (d_out, d_in), scale and zero (d_out, n_groups) of ``v`` with each group's range shrunk by
    ``beta`` (d_out, n_groups): ``S = beta S_minmax``, ``Z = beta Z_minmax``; weights outside clamp to the ends."""
    sc0, z0 = group_params(v, spec, check=False)
    return quantize(v, spec, sc0 * beta, z0 * beta, check=False)


# ---------------------------------------------------------------- 3. prompt-aware low rank


def prompt_factors(w: torch.Tensor, s: torch.Tensor, rank: int, exact: bool | None = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``B (d_out, r), A (r, d_in)`` with ``B A diag(s) = svd_r[W diag(s)]``, float32.

    Args:
        w: (d_out, d_in) weight; s: (d_in,) this sequence's scale; rank: r >= 1.
        exact: as in :func:`ttq.methods.lowrank.svd_factors` (False: randomized, fixed seed).
    """
    b, a_s = svd_factors(w.float() * s, rank, exact=exact)  # (d_out, r), (r, d_in) of W diag(s)
    return b, a_s / s  # A = A_s diag(s)^-1


# ---------------------------------------------------------------- 4. test-time GPTQ


def gptq_codes(w_res: torch.Tensor, s: torch.Tensor, tokens: TokenStats, spec: QuantSpec, damp: float = 0.01
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes uint8 (d_out, d_in), scale, zero (d_out, n_groups) of ``w_res diag(s)`` by GPTQ with the
    sequence's ``H = 2 X X^T / T`` (:func:`ttq.methods.gptq.gptq_quantize`, natural order, no act-order).

    A zero diagonal entry (a channel no token used) is floored at ``1e-6 mean(diag H)`` so that GPTQ
    rounds the column instead of zeroing it (later tokens may use the channel)."""
    h = gptq_hessian(tokens.gram, tokens.n_tokens)  # (d_in, d_in)
    diag = torch.diagonal(h)
    top = diag.mean()
    if (diag <= 0).any() and top > 0:
        h = h.clone()
        torch.diagonal(h).clamp_(min=float(top) * 1e-6)
    elif top <= 0:  # no token carried any signal: H = I (plain rounding)
        h = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    codes, sc, z, _ = gptq_quantize(w_res, h, spec, damp=damp, scale=s)
    return codes, sc, z


# ---------------------------------------------------------------- all of it


@dataclass(frozen=True)
class Refined:
    """One layer's refined quantization for one sequence (plain data).

    Args:
        codes, scale, zero: of ``(W - B A) diag(s)``: uint8 (d_out, d_in), float32 (d_out, n_groups) x2.
        s: (d_in,) float32 scale (at the chosen alpha).
        b, a: the low-rank factors the product adds back, (d_out, r), (r, d_in) float32, or None (r = 0).
        alpha: the alpha ``s`` was computed with.
        alpha_errors: the alpha search's error per grid value (empty without ``alpha_grid``).
        beta: the per-group shrinks (d_out, n_groups), or None without ``clip_grid``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    s: torch.Tensor
    b: torch.Tensor | None
    a: torch.Tensor | None
    alpha: float
    alpha_errors: tuple[float, ...] = ()
    beta: torch.Tensor | None = None

    def weight(self, spec: QuantSpec) -> torch.Tensor:
        """The effective weight ``B A + deq(codes) diag(s)^-1`` (d_out, d_in) float32 (``spec``: the format)."""
        w = dequantize(self.codes, self.scale, self.zero, spec.group_size, fmt=spec.fmt) / self.s
        return w + self.b @ self.a if self.b is not None and self.b.shape[1] else w


def refine_quantize(
    w: torch.Tensor,
    stats: ChannelStats,
    tokens: TokenStats,
    spec: QuantSpec,
    scale: ScaleSpec,
    refine: RefineSpec,
    b: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
    w_res: torch.Tensor | None = None,
) -> Refined:
    """TTQ of one layer for one sequence with the refinements of ``refine`` (order: module docstring).

    Args:
        w: (d_out, d_in) full-precision weight.
        stats: the sequence's statistic for ``s`` (``scale.p``); tokens: its :class:`TokenStats`.
        spec, scale: format and statistic (``scale.alpha`` unless ``alpha_grid`` chooses).
        refine: the refinements.
        b, a: the static factors (d_out, r), (r, d_in) float32, or None (r = 0); with
            ``prompt_lowrank`` only their rank is used.
        w_res: the cached ``W - B A`` float32 (computed here when None; unused with ``prompt_lowrank``).
    Returns:
        a :class:`Refined`; with no refinement switched on it is plain TTQ's quantization.
    """
    rank = 0 if b is None else b.shape[1]
    if refine.prompt_lowrank and rank:
        b, a = prompt_factors(w, input_scale(stats, scale), rank, refine.svd_exact)  # at the config's alpha
        w_res = residual(w, b, a)
    elif w_res is None:
        w_res = residual(w, b, a) if rank else w.float()
    alpha, errors = float(scale.alpha), ()
    if refine.joint:  # each alpha scored after its own clipping search
        return _joint(w_res, stats, tokens, spec, scale, refine, b if rank else None, a if rank else None)
    if refine.alpha_grid is not None:
        alpha, errs = search_alpha(w_res, stats, tokens, spec, scale, refine.alpha_grid, refine.score)
        errors = tuple(errs)
    s = input_scale(stats, dataclasses.replace(scale, alpha=alpha) if alpha != scale.alpha else scale)  # (d_in,)
    beta = None
    if refine.gptq:
        codes, sc, z = gptq_codes(w_res, s, tokens, spec, refine.damp)
    elif refine.hqq:
        from ttq.methods.hqq import hqq_quantize

        codes, sc, z = hqq_quantize(w_res * s, spec)  # (d_out, d_in) scaled weight
    elif refine.clip_grid is not None:
        codes, sc, z, beta, _ = clipped_codes(w_res, s, tokens, spec, refine.clip_grid, refine.score)
    else:
        codes, sc, z = quantize(w_res * s, spec, check=False)
    lowrank = rank > 0
    return Refined(codes, sc, z, s, b if lowrank else None, a if lowrank else None, alpha, errors, beta)


def _joint(w_res: torch.Tensor, stats: ChannelStats, tokens: TokenStats, spec: QuantSpec, scale: ScaleSpec,
           refine: RefineSpec, b: torch.Tensor | None, a: torch.Tensor | None) -> Refined:
    """``refine.joint``: for each alpha of the grid the clipping search, then the alpha whose clipped codes have
    the least diagonal error (first on ties); the C++ search where it runs, else the PyTorch one."""
    best = None
    errors = []
    for alpha in refine.alpha_grid:
        s = input_scale(stats, dataclasses.replace(scale, alpha=float(alpha)))  # (d_in,)
        codes, sc, z, beta, err = clipped_codes(w_res, s, tokens, spec, refine.clip_grid, "diag")
        if err is not None:
            total = float(err.double().sum())
        else:
            total = weighted_error(w_res - dequantize(codes, sc, z, spec.group_size, fmt=spec.fmt) / s, tokens)
        errors.append(total)
        if best is None or total < best[0]:
            best = (total, float(alpha), codes, sc, z, s, beta)
    _, alpha, codes, sc, z, s, beta = best
    return Refined(codes, sc, z, s, b, a, alpha, tuple(errors), beta)
