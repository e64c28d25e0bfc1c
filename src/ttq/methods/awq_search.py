"""AWQ as llm-awq / AutoAWQ run it (Lin et al., MLSys 2024, Sec. 3.2-3.3): the pure math.

Two searches, each returning plain data; :mod:`ttq.patch.awq_search` runs them block by block.

**Scale search** (llm-awq ``auto_scale``).  For a group of linears reading one input ``X`` (T, d_in), the
per-input-channel scale is ``s = mean_t |X_t|^alpha`` (clamped at 1e-4), normalised by
``sqrt(max(s) min(s))``; each linear becomes ``Q[W diag(s)] diag(s)^-1``.  Alpha runs over the grid
``0, 1/n, ..., (n-1)/n`` (n = 20) and the one with the smallest output MSE of a *module* (the attention, the
MLP, or the linear itself; computed by the caller, :func:`grid_search` takes it as a function) wins.  Alpha
= 0 is plain round-to-nearest, so the search is never worse than RTN on its objective.

**Clip search** (llm-awq ``auto_clip``).  For one linear (weights and inputs already scaled:
``W diag(s)``, ``X diag(s)^-1``), each group's range is clipped to ``[-r m, r m]`` with ``m`` the group's
max |w|, ``r`` over ``1 - i/n`` for ``i < max_shrink n`` (n = 20, max_shrink = 0.5: 1.0, 0.95, ..., 0.55),
and each group keeps the ``r`` with the smallest MSE of its *partial* output ``sum_{k in group} x_k w_k``
over a token subsample.  ``r = 1`` is in every grid, so clipping is never worse than no clipping on this
objective, group by group.

Granularity: ``group_size`` as everywhere (:mod:`ttq.formats.spec`; -1 one group per row, a short last group
when ``g`` does not divide ``d_in``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ttq.errors import ConfigError
from ttq.formats.affine import QuantSpec, effective_group_size, expand_groups, num_groups, qdq

SCALE_FLOOR = 1e-4  # llm-awq clamps mean|x|^alpha here before normalising


def scale_grid(n_grid: int) -> tuple[float, ...]:
    """llm-awq's alpha candidates ``(0, 1/n, ..., (n-1)/n)``."""
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
        raise ConfigError(f"the scale grid needs n_grid >= 1 points, got {n_grid!r}")
    return tuple(i / n_grid for i in range(n_grid))


def clip_ratios(n_grid: int, max_shrink: float) -> tuple[float, ...]:
    """llm-awq's clipping candidates ``1 - i/n`` for ``i < max_shrink * n`` (n = 20, 0.5: 1.0 .. 0.55)."""
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
        raise ConfigError(f"the clip grid needs n_grid >= 1 points, got {n_grid!r}")
    if not 0.0 < max_shrink < 1.0:
        raise ConfigError(f"clip max_shrink must be in (0, 1) (ratios 1 - i/n_grid stay in (0, 1]), got {max_shrink!r}")
    ratios = tuple(1.0 - i / n_grid for i in range(int(max_shrink * n_grid)))
    if not ratios:
        raise ConfigError(f"empty clip grid: max_shrink {max_shrink} x n_grid {n_grid} < 1 candidate")
    return ratios


def activation_mean(x: torch.Tensor) -> torch.Tensor:
    """``mean_t |x_t|`` (d,) float32 of activations (..., d); all leading dims are tokens."""
    if x.numel() == 0:
        raise ConfigError(f"the AWQ scale needs at least one token, got activations of shape {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1]).float().abs().mean(0)  # (..., d) -> (T, d) -> (d,)


def awq_scale(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """llm-awq's scale ``s = max(x_mean^alpha, 1e-4) / sqrt(max(s) min(s))`` (d,) float32 (alpha = 0: ones)."""
    if not 0.0 <= alpha <= 4.0:
        raise ConfigError(f"alpha must be in [0, 4], got {alpha!r}")
    s = x_mean.float().pow(alpha).clamp_min(SCALE_FLOOR)
    return s / (s.max() * s.min()).sqrt()


def scaled_fake_quant(w: torch.Tensor, s: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``Q[W diag(s)] diag(s)^-1`` (d_out, d_in) in ``w``'s dtype."""
    if s.shape != (w.shape[1],):
        raise ConfigError(f"scale has shape {tuple(s.shape)}, expected ({w.shape[1]},) for weight {tuple(w.shape)}")
    return (qdq(w.float() * s, spec) / s).to(w.dtype)  # (d_out, d_in) * (d_in,)


def grid_search(loss: Callable[[float], float], alphas: tuple[float, ...]) -> dict:
    """The alpha of ``alphas`` with the smallest ``loss(alpha)`` (the first on ties, as llm-awq).

    Returns:
        ``{"alpha": float, "loss": float, "losses": [float per alpha]}``.
    """
    if not alphas:
        raise ConfigError("the AWQ scale search needs at least one alpha candidate (empty grid)")
    losses = [float(loss(float(a))) for a in alphas]
    best = min(range(len(alphas)), key=lambda i: (losses[i], i))  # NaN losses never win: checked below
    if any(math.isnan(v) for v in losses):
        raise ConfigError(f"the AWQ scale search got a NaN output error for alphas {alphas}: {losses}")
    return {"alpha": float(alphas[best]), "loss": losses[best], "losses": losses}


def _padded_groups(t: torch.Tensor, g: int) -> torch.Tensor:
    """(rows, d_in) -> (rows, n_groups, g), a short last group padded with zeros (no partial-output term)."""
    pad = (-t.shape[1]) % g
    return F.pad(t, (0, pad)).reshape(t.shape[0], -1, g)


def group_max(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Max |w| per group (d_out, n_groups) float32."""
    g = effective_group_size(w.shape[1], group_size)
    return _padded_groups(w.float().abs(), g).amax(-1)  # (d_out, G, g) -> (d_out, G)


def clip_weight(w: torch.Tensor, max_val: torch.Tensor, group_size: int) -> torch.Tensor:
    """``clamp(w, -m, m)`` with ``m`` (d_out, n_groups) per group; (d_out, d_in) in ``w``'s dtype."""
    if max_val.shape != (w.shape[0], num_groups(w.shape[1], group_size)):
        raise ConfigError(f"clip max_val has shape {tuple(max_val.shape)}, expected "
                          f"({w.shape[0]}, {num_groups(w.shape[1], group_size)}) for weight {tuple(w.shape)}")
    m = expand_groups(max_val.float(), w.shape[1], group_size)  # (d_out, G) -> (d_out, d_in)
    return torch.maximum(torch.minimum(w.float(), m), -m).to(w.dtype)


def group_output_error(e: torch.Tensor, x: torch.Tensor, group_size: int, chunk: int = 1 << 24) -> torch.Tensor:
    """Mean over tokens of each group's squared partial output error: ``mean_t (sum_{k in group} x_tk e_ok)^2``.

    Args:
        e: (d_out, d_in) weight error.
        x: (T, d_in) inputs.
        group_size: the format's group size.
        chunk: at most this many floats per intermediate (d_out rows are taken in slices).
    Returns:
        (d_out, n_groups) float32.
    """
    g = effective_group_size(e.shape[1], group_size)
    xg = _padded_groups(x.float(), g)  # (T, d_in) -> (T, G, g)
    rows = max(1, chunk // max(1, xg.shape[0] * xg.shape[1]))
    out = []
    for r0 in range(0, e.shape[0], rows):
        eg = _padded_groups(e[r0 : r0 + rows].float(), g)  # (r, d_in) -> (r, G, g)
        part = torch.einsum("rgk,tgk->rtg", eg, xg)  # (r, T, G): each group's partial output error
        out.append(part.square().mean(1))  # (r, G)
    return torch.cat(out, 0)


def clip_search(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, ratios: tuple[float, ...]) -> dict:
    """Per-group clipping ratio of ``w`` minimising each group's partial output error on ``x``.

    Args:
        w: (d_out, d_in) weight (already scaled by the AWQ scale, if any).
        x: (T, d_in) inputs (already divided by that scale), e.g. a token subsample.
        spec: the format.
        ratios: candidates in (0, 1] (:func:`clip_ratios`).
    Returns:
        ``{"max_val": (d_out, G), "ratio": (d_out, G), "loss": float, "loss_noclip": float}``: the chosen
        per-group clip value and ratio, and the summed objective with it and with ``r = 1`` (no clipping)
        (``loss_noclip`` is None when 1 is not a candidate).
    """
    if not ratios:
        raise ConfigError("the clip search needs at least one ratio (empty grid)")
    if not all(0.0 < r <= 1.0 for r in ratios):
        raise ConfigError(f"clip ratios must be in (0, 1], got {ratios}")
    if x.ndim != 2 or x.shape[1] != w.shape[1] or x.shape[0] == 0:
        raise ConfigError(f"clip search needs inputs (T >= 1, {w.shape[1]}), got {tuple(x.shape)}")
    wf = w.float()
    org = group_max(wf, spec.group_size)  # (d_out, G)
    best_err = best_ratio = None
    noclip = None
    for r in ratios:
        err = group_output_error(qdq(clip_weight(wf, org * r, spec.group_size), spec) - wf, x, spec.group_size)
        if r == 1.0:
            noclip = float(err.sum())
        if best_err is None:
            best_err, best_ratio = err, torch.full_like(err, r)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio = torch.where(better, torch.full_like(err, r), best_ratio)
    return {"max_val": org * best_ratio, "ratio": best_ratio, "loss": float(best_err.sum()), "loss_noclip": noclip}
