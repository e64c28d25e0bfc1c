"""Block-wise reconstruction: learn each decoder block's weight adjustment through a fake quantizer, block by
block (OmniQuant, Shao et al., ICLR 2024, Sec. 3; the host of LSI / SDE in "Compensate Quantization Errors+").

For decoder block ``i``, in order (the blocks come from :func:`ttq.patch.find_blocks`, their calls from the
one full-precision pass of :func:`ttq.patch.sequential.capture_block_inputs`, so any architecture the walker
knows works):

1. inputs ``X_q``: the calibration windows through the already finalised blocks ``0..i-1`` (quantized);
   targets ``Y``: the **full-precision block on the full-precision inputs** (OmniQuant's ``fp_inps``; the
   full-precision stream is carried alongside the quantized one);
2. its planned linears are replaced by :class:`LearnedLinear` (the weight's learnable adjustment, then a
   straight-through fake quantizer, :mod:`ttq.methods.reconstruct`); everything else is frozen;
3. AdamW (weight decay 0, batch 1, one window per step, ``epochs`` passes in a seeded order) minimises
   ``MSE(block(X_q), Y)``, plus ``lambda * MSE(block_{i+1}(block(X_q)), Y_{i+1})`` with cross-layer
   learning (eq. 13; block ``i + 1`` full precision and frozen, the gradient passes through it);
   a loss that is not finite stops with :class:`ReconstructionError` naming the block and step;
4. the block is finalised: weights formed, quantized to real codes with the trained ranges
   (:class:`ttq.nn.linear.StaticQuantLinear`, so :func:`ttq.patch.restore_` undoes it and every kernel and
   export path applies), or kept as full-precision adjusted weights (``finalize="fp"``: an ``nn.Linear``
   keeping ``.original``, for another method on top) or put under TTQ (``finalize="ttq"``); the SVD factors
   and learned parameters are dropped from the model;
5. the finalised block maps ``X_q`` to the next block's inputs.

Memory: the hidden states of all windows are kept on the model's device in **bfloat16** (two streams,
three with cross-layer learning: ``n_windows x seqlen x d_model x 2`` bytes each; 19 MB for 32 x 512 tokens
of SmolLM2-135M); each block computes in the model's dtype, losses in float32.

Resumable: every finished block's tensors (codes, scale, zero or the adjusted weights, and the learned
parameters) are saved as safetensors in ``<cache>/reconstruct/<key>/blockNNN.safetensors``, the key hashing
ttq's code, the model's weights, every layer's config and the calibration token ids (:mod:`ttq.cache`); a
rerun loads the finished blocks instead of training them (it still runs their forwards).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ttq.cache import (
    cache_root,
    code_fingerprint,
    digest,
    load_tensors,
    model_fingerprint,
    save_tensors,
    tensor_digest,
    writable,
)
from ttq.errors import ConfigError, TTQError
from ttq.formats.affine import QuantSpec, num_groups, quantize
from ttq.methods.reconstruct import (
    LWC_INIT,
    SVDBasis,
    adjusted_weight,
    clip_range,
    fake_quant,
    svd_basis,
    ttq_fake_quant,
)
from ttq.methods.rtn import rtn_quantize
from ttq.methods.scaling import ScaleSpec
from ttq.methods.ttq import ttq_scale
from ttq.nn.linear import StaticQuantLinear, TTQLinear
from ttq.patch.blocks import as_linear, find_blocks, set_module
from ttq.patch.sequential import BlockCall, capture_block_inputs

logger = logging.getLogger(__name__)

FINALIZE = ("codes", "fp", "ttq")
STORE_DTYPE = torch.bfloat16  # hidden states of the calibration windows between blocks


class ReconstructionError(TTQError, RuntimeError):
    """Training a block failed (a loss that is not finite); the blocks finished before it are kept."""


@dataclass(frozen=True)
class LayerSpec:
    """What one layer learns.

    Args:
        quant: its integer format.
        lwc: learn clipping factors of each group's max / min (OmniQuant's LWC).
        n: singular-value band half-width: None none, 0 LSI (the singular values), > 0 SDE.
    """

    quant: QuantSpec
    lwc: bool = True
    n: int | None = None


@dataclass(frozen=True)
class TrainSpec:
    """How a run trains (the same for every layer of the run).

    Args:
        epochs: passes over the calibration windows per block.
        lr: AdamW learning rate of the singular-value (LSI / SDE) increments.
        lwc_lr: AdamW learning rate of the LWC logits.
        seed: seed of the window order (block ``i`` uses ``seed`` and ``i``).
        cross_layer: add the next block's output error (eq. 13), weighted by ``cl_lambda``.
        cl_lambda: lambda of eq. 13.
        ttq: train with TTQ's quantizer, the diagonal from each window's own tokens (None: static min-max/LWC).
        finalize: ``"codes"`` (StaticQuantLinear), ``"fp"`` (adjusted full-precision weights) or ``"ttq"``.
    """

    epochs: int
    lr: float
    lwc_lr: float
    seed: int = 0
    cross_layer: bool = False
    cl_lambda: float = 0.05
    ttq: ScaleSpec | None = None
    finalize: str = "codes"


@dataclass
class BlockReport:
    """What happened to one block (logged, returned by :func:`reconstruct_replace`, kept in its cache file)."""

    block: int
    layers: int
    weights: int
    learned: dict[str, int]  # {"lwc": k, "svd": k} parameter counts
    steps: int
    seconds: float
    loss: float  # MSE of the finalised block's outputs vs the targets, mean over the windows
    loss_ref: float  # the same for the untrained host quantizer (RTN min-max, or TTQ)
    epoch_losses: list[float] = field(default_factory=list)  # training loss per epoch (with the CL term)
    peak_mib: float = 0.0
    cached: bool = False


class LearnedLinear(nn.Module):
    """A linear layer during training: ``W' = W + U Map(I^D) V`` (or ``W``), then the fake quantizer.

    Parameters: ``up`` / ``low`` (d_out, n_groups) LWC logits (init 4), ``inc`` (2n + 1, b) singular-value
    increments (init 0).  The weight and bias are frozen.
    """

    def __init__(self, linear: nn.Module, spec: LayerSpec, ttq: ScaleSpec | None = None) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        self.w, self.bias, self.spec, self.ttq = w, linear.bias, spec, ttq
        d_out, d_in = w.shape
        self.up = self.low = self.inc = None
        if spec.lwc:
            shape = (d_out, num_groups(d_in, spec.quant.group_size))
            self.up = nn.Parameter(torch.full(shape, LWC_INIT, device=w.device))
            if not spec.quant.symmetric:
                self.low = nn.Parameter(torch.full(shape, LWC_INIT, device=w.device))
        self.basis: SVDBasis | None = None
        if spec.n is not None:
            self.basis = svd_basis(w, spec.n)
            self.inc = nn.Parameter(torch.zeros(self.basis.rows, self.basis.b, device=w.device))

    def learned_parameters(self) -> list[nn.Parameter]:
        """The trained parameters (not the frozen bias)."""
        return [p for p in (self.up, self.low, self.inc) if p is not None]

    def counts(self) -> dict[str, int]:
        """Learned parameters: LWC logits and used singular-value increments."""
        lwc = sum(p.numel() for p in (self.up, self.low) if p is not None)
        return {"lwc": lwc, "svd": self.basis.size if self.basis is not None else 0}

    def adjusted(self) -> torch.Tensor:
        """``W'`` (d_out, d_in) float32."""
        return self.w if self.inc is None else adjusted_weight(self.w, self.basis, self.inc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.adjusted()
        if self.ttq is not None:
            w_hat = ttq_fake_quant(w, ttq_scale(x.detach(), self.ttq), self.spec.quant)  # s from this window
        else:
            scale, zero = clip_range(w, self.spec.quant, self.up, self.low)
            w_hat = fake_quant(w, self.spec.quant, scale, zero)
        return F.linear(x, w_hat.to(x.dtype), self.bias)

    @torch.no_grad()
    def final_tensors(self, finalize: str) -> dict[str, torch.Tensor]:
        """What the finalised layer holds: ``codes``/``scale``/``zero``, or the adjusted ``weight``; plus the
        learned parameters (``lwc_up``, ``lwc_low``, ``increments``) for inspection."""
        w = self.adjusted()
        if finalize == "codes":
            scale, zero = clip_range(w, self.spec.quant, self.up, self.low)
            codes, scale, zero = quantize(w, self.spec.quant, scale=scale, zero=zero)
            out = {"codes": codes, "scale": scale, "zero": zero}
        else:
            out = {"weight": w.clone()}
        for key, p in (("lwc_up", self.up), ("lwc_low", self.low), ("increments", self.inc)):
            if p is not None:
                out[key] = p.detach().clone()
        return out


def adjusted_linear(original: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` (d_out, d_in) in the original's dtype and the original's bias,
    keeping ``original`` as ``.original`` (:func:`ttq.patch.restore_` puts it back; another method applied
    on top is undone by its own ``restore_`` first)."""
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = original.in_features, original.out_features
    lin.weight = nn.Parameter(weight.to(original.weight.dtype), requires_grad=False)
    lin.bias = original.bias
    lin.original = original
    return lin


def final_module(original: nn.Module, tensors: Mapping[str, torch.Tensor], spec: LayerSpec, train: TrainSpec) -> nn.Module:
    """The module that replaces ``original`` (an ``nn.Linear``, or the view :func:`ttq.patch.blocks.as_linear`
    gives) after training, from :meth:`LearnedLinear.final_tensors`."""
    dev = original.weight.device
    if train.finalize == "codes":
        t = {k: tensors[k].to(dev) for k in ("codes", "scale", "zero")}
        return StaticQuantLinear(original, t["codes"], t["scale"], t["zero"], spec.quant)
    lin = adjusted_linear(original, tensors["weight"].to(dev))
    if train.finalize == "fp":
        return lin
    layer = TTQLinear(lin, spec.quant, train.ttq)  # TTQ on the adjusted weights ...
    layer.original = original  # ... and restore_ puts the untouched layer back
    return layer


def reference_module(original: nn.Module, spec: LayerSpec, train: TrainSpec) -> nn.Module:
    """The untrained host quantizer the trained block is compared with: RTN (min-max), or TTQ."""
    if train.ttq is not None:
        return TTQLinear(original, spec.quant, train.ttq)
    codes, scale, zero = rtn_quantize(original.weight, spec.quant)
    return StaticQuantLinear(original, codes, scale, zero, spec.quant)


def adjusted_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<layer>.weight": W'}`` of every layer finalised to full-precision adjusted weights (``finalize="fp"`` or
    ``"ttq"``), in the layer's dtype."""
    out = {}
    for name, mod in model.named_modules():
        orig = getattr(mod, "original", None)
        w = getattr(mod, "weight", None)
        if isinstance(orig, nn.Module) and isinstance(w, torch.Tensor) and w is not getattr(orig, "weight", None):
            out[f"{name}.weight"] = w.detach()
    return out


def save_adjusted(model: nn.Module, path: str | Path) -> int:
    """Write :func:`adjusted_weights` to a safetensors file (loadable with ``safetensors.torch.load_file``; copy
    them into the model's linears and run e.g. ``TTQConfig`` on top); returns how many were written."""
    from safetensors.torch import save_file

    weights = {k: v.cpu().contiguous() for k, v in adjusted_weights(model).items()}
    if not weights:
        raise ConfigError("the model holds no adjusted weights (finalize='fp' or 'ttq' makes them)")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path), metadata={"ttq": "adjusted weights (block-wise reconstruction)"})
    return len(weights)


# ---------------------------------------------------------------- the engine


def _specs(plan: Mapping[str, Any]) -> tuple[TrainSpec, dict[str, LayerSpec]]:
    """The run's :class:`TrainSpec` (every config must agree) and each layer's :class:`LayerSpec`."""
    trains, layers = set(), {}
    for name, cfg in plan.items():
        if not (callable(getattr(cfg, "train_spec", None)) and callable(getattr(cfg, "layer_spec", None))):
            raise ConfigError(f"layer {name!r} has config {type(cfg).__name__}, which block-wise reconstruction cannot "
                              "train; a plan cannot mix reconstruction configs (LWC, SDE) with other sequential methods")
        trains.add(cfg.train_spec())
        layers[name] = cfg.layer_spec()
    if len(trains) != 1:
        raise ConfigError("the layers of one reconstruction run must share epochs, learning rates, seed, cross-layer "
                          f"learning, TTQ and finalisation; got {len(trains)} different settings")
    return trains.pop(), layers


def _run_key(model: nn.Module, plan: Mapping[str, Any], windows: torch.Tensor) -> str:
    """Cache key of a run: ttq's code, the model's weights, every layer's config, the token ids, device and dtype."""
    cfgs = {n: {"method": c.name, **dataclasses.asdict(c)} for n, c in sorted(plan.items())}
    p = next(model.parameters())
    return digest(code_fingerprint(), model_fingerprint(model), json.dumps(cfgs, sort_keys=True, default=str),
                  tensor_digest(windows), p.device.type, str(p.dtype))


def _dtype(block: nn.Module) -> torch.dtype:
    return next((p.dtype for p in block.parameters() if p.is_floating_point()), torch.float32)


@torch.no_grad()
def _forward(block: nn.Module, calls: list[list[BlockCall]], i: int, xs: list[torch.Tensor],
             targets: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], float]:
    """Block ``i`` on every window: (outputs in :data:`STORE_DTYPE`, mean MSE against ``targets`` or nan)."""
    dtype, outs, total = _dtype(block), [], 0.0
    for w, x in enumerate(xs):
        y = calls[w][i](block, x.to(dtype))
        if targets is not None:
            total += F.mse_loss(y.float(), targets[w].float()).item()
        outs.append(y.to(STORE_DTYPE))
    return outs, (total / len(xs) if targets is not None else float("nan"))


@contextlib.contextmanager
def _frozen(*modules: nn.Module | None) -> Iterator[None]:
    """No gradient for the modules' own parameters (the learned ones are set up after); flags restored on exit."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def _peak_mib(device: torch.device) -> float:
    """Peak memory so far: CUDA allocations on a GPU, the process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train_block(
    block: nn.Module,
    learn: Mapping[str, LearnedLinear],
    calls: list[list[BlockCall]],
    i: int,
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    train: TrainSpec,
    nxt: nn.Module | None = None,
    next_targets: list[torch.Tensor] | None = None,
    label: str = "block",
    progress: bool = False,
) -> list[float]:
    """AdamW on the learned parameters of ``learn`` (already placed in ``block``); returns the loss per epoch.

    Args:
        block: decoder block ``i`` holding the :class:`LearnedLinear` layers.
        calls: per window, per block, the block's other arguments.
        inputs, targets: per window (1, T, d): quantized-prefix inputs and full-precision targets.
        nxt, next_targets: block ``i + 1`` (frozen) and its full-precision outputs, for cross-layer learning.
        progress: always show the bar (else only on a terminal).
    Raises:
        ReconstructionError: the loss is not finite (the block and the step are named).
    """
    lwc = [p for m in learn.values() for p in (m.up, m.low) if p is not None]
    svd = [m.inc for m in learn.values() if m.inc is not None]
    groups = ([{"params": lwc, "lr": train.lwc_lr}] if lwc else []) + ([{"params": svd, "lr": train.lr}] if svd else [])
    if not groups:
        raise ConfigError(f"{label}: nothing to learn (no LWC and no singular-value increments)")
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    gen = torch.Generator().manual_seed(train.seed * 1_000_003 + i)
    dtype, n = _dtype(block), len(inputs)
    from tqdm.auto import tqdm

    bar = tqdm(total=train.epochs * n, desc=label, unit="step", leave=False, disable=False if progress else None)
    losses, step = [], 0
    try:
        for epoch in range(train.epochs):
            total = 0.0
            for w in torch.randperm(n, generator=gen).tolist():
                step += 1
                y = calls[w][i](block, inputs[w].to(dtype))
                loss = F.mse_loss(y.float(), targets[w].float())
                if nxt is not None:
                    y2 = calls[w][i + 1](nxt, y)
                    loss = loss + train.cl_lambda * F.mse_loss(y2.float(), next_targets[w].float())
                value = loss.item()
                if not torch.isfinite(loss):
                    raise ReconstructionError(
                        f"{label}: the training loss became {value} at epoch {epoch + 1}, step {step} (window {w}); "
                        "stopped this block, the blocks before it are finished and kept (and cached). Try a lower "
                        "learning rate (lr / lwc_lr) or check the model for non-finite activations"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += value
                bar.set_postfix(loss=f"{value:.4g}", refresh=False)
                bar.update()
            losses.append(total / n)
    finally:
        bar.close()
    return losses


def _load_block(path: Path | None, names: list[str]) -> tuple[dict[str, dict[str, torch.Tensor]], BlockReport] | None:
    """A finished block's tensors per layer and its report, or None (absent, unreadable or incomplete)."""
    if path is None or not path.is_file():
        return None
    loaded = load_tensors(path)
    if loaded is None:
        return None
    tensors, meta = loaded
    per = {n: {k.partition("/")[2]: t for k, t in tensors.items() if k.partition("/")[0] == n} for n in names}
    try:
        report = BlockReport(**{**json.loads(meta["ttq.block"]), "cached": True})
    except (KeyError, ValueError, TypeError):
        report = None
    if report is None or any(not t for t in per.values()):
        logger.warning("ignoring incomplete reconstruction cache %s; training the block again", path)
        return None
    return per, report


def reconstruct_replace(
    model: nn.Module,
    linears: Mapping[str, nn.Module],
    plan: Mapping[str, Any],
    windows: torch.Tensor,
    progress: bool = False,
) -> list[BlockReport]:
    """Train and finalise the planned linears block by block (the module docstring's steps 1-5).

    Args:
        model: the causal LM (modified in place).
        linears: ``{name: linear}`` candidates (:func:`ttq.patch.block_linears`).
        plan: ``{name: config}`` of the layers to train; every config gives ``layer_spec()`` and ``train_spec()``
            (``ttq.quantizers.sde``: ``LWCConfig``, ``SDEConfig``), the latter equal for all.
        windows: (n, seqlen) integer calibration token ids.
        progress: show the per-block bars even off a terminal.
    Returns:
        One :class:`BlockReport` per block that has planned layers.
    Raises:
        ReconstructionError: a block's loss became NaN/Inf (the finished blocks stay quantized and cached).
    """
    train, specs = _specs(plan)
    prefix, blocks = find_blocks(model)
    owner = {name: int(name[len(prefix) + 1:].split(".")[0]) for name in plan}
    if not owner:
        return []
    last = max(owner.values())
    folder = writable(cache_root() / "reconstruct" / _run_key(model, plan, windows), "reconstruction")
    hidden, calls = capture_block_inputs(model, blocks, windows)
    q = [h.to(STORE_DTYPE) for h in hidden]  # quantized-prefix stream
    fp = list(q)  # full-precision stream
    del hidden
    device = next(model.parameters()).device
    logger.info("block-wise reconstruction: %d windows of %d tokens, blocks %s.0..%d, %d epochs, cross-layer %s, "
                "finalise to %s%s", *windows.shape, prefix, last, train.epochs,
                f"lambda={train.cl_lambda}" if train.cross_layer else "off", train.finalize,
                f", cache {folder}" if folder else "")
    reports, fp_next = [], None
    for i in range(last + 1):
        block = blocks[i]
        mine = sorted(n for n, b in owner.items() if b == i)
        fp_out = fp_next if fp_next is not None else _forward(block, calls, i, fp)[0]  # FP block on FP inputs
        fp_next = None
        if not mine:
            q, fp = _forward(block, calls, i, q)[0], fp_out
            continue
        nxt = blocks[i + 1] if train.cross_layer and i + 1 < len(blocks) else None
        if nxt is not None:
            fp_next = _forward(nxt, calls, i + 1, fp_out)[0]
        label = f"{prefix}.{i}"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rel = {n: n[len(label) + 1:] for n in mine}
        path = folder / f"block{i:03d}.safetensors" if folder else None
        t0 = time.perf_counter()
        cached = _load_block(path, list(rel.values()))
        if cached is not None:
            per, report = cached
            final = {n: final_module(as_linear(linears[n]), per[rel[n]], specs[n], train) for n in mine}
            logger.info("%s: loaded from cache %s", label, path)
        else:
            report, tensors = _train_one(model, block, nxt, linears, specs, mine, calls, i, q, fp_out, fp_next,
                                         train, label, progress)
            final = {n: final_module(as_linear(linears[n]), tensors[n], specs[n], train) for n in mine}
        if train.finalize == "fp":  # the next inputs come from the block as deployed: quantized, like in training
            for n, mod in final.items():
                set_module(model, n, reference_module(mod, specs[n], train))
            q, report.loss = _forward(block, calls, i, q, fp_out)
        for n, mod in final.items():
            set_module(model, n, mod)
        if train.finalize != "fp":
            q, report.loss = _forward(block, calls, i, q, fp_out)
        fp = fp_out
        if not report.cached:
            report.seconds = time.perf_counter() - t0
            report.peak_mib = _peak_mib(device)
            if path is not None:
                flat = {f"{rel[n]}/{k}": t for n in mine for k, t in tensors[n].items()}
                save_tensors(path, flat, {"ttq.block": json.dumps(dataclasses.asdict(report))})
        ref = "TTQ" if train.ttq is not None else "RTN"
        logger.info("%s: MSE %.4g (untrained %s %.4g, %.1f%%); epoch losses %s; %d steps in %.1f s; peak memory %.0f MiB%s",
                    label, report.loss, ref, report.loss_ref, 100 * report.loss / max(report.loss_ref, 1e-30),
                    " ".join(f"{v:.4g}" for v in report.epoch_losses), report.steps, report.seconds,
                    report.peak_mib, " (cached)" if report.cached else "")
        reports.append(report)
    return reports


def _train_one(model, block, nxt, linears, specs, mine, calls, i, q, fp_out, fp_next, train, label, progress):
    """Train block ``i``'s planned layers; returns its report and each layer's final tensors (the model's
    block holds its original layers again on return, also after an error)."""
    origs = {n: as_linear(linears[n]) for n in mine}
    learn = {n: LearnedLinear(origs[n], specs[n], train.ttq) for n in mine}
    for n, m in learn.items():
        if m.basis is not None and m.basis.n < specs[n].n:
            a, b = max(m.w.shape), min(m.w.shape)
            logger.info("%s: SDE band n=%d capped at %d (a %d x %d weight has %d diagonals below the main one)",
                        n, specs[n].n, m.basis.n, a, b, a - 1)
    counts = {k: sum(m.counts()[k] for m in learn.values()) for k in ("lwc", "svd")}
    weights = sum(m.w.numel() for m in learn.values())
    kinds = {"lwc": "LWC", "svd": "SDE" if any(specs[n].n for n in mine) else "LSI"}
    learned = ", ".join(f"{kinds[k]} {v} ({100 * v / weights:.2f}%)" for k, v in counts.items() if v)
    logger.info("%s: training %d layers (%d weights), learned parameters: %s; %d steps", label, len(mine), weights,
                learned, train.epochs * len(q))
    try:
        for n in mine:  # the untrained host quantizer, for comparison
            set_module(model, n, reference_module(origs[n], specs[n], train))
        loss_ref = _forward(block, calls, i, q, fp_out)[1]
        for n, m in learn.items():
            set_module(model, n, m)
        with torch.enable_grad(), _frozen(block, nxt):
            for m in learn.values():
                for p in m.learned_parameters():
                    p.requires_grad_(True)
            epoch_losses = train_block(block, learn, calls, i, q, fp_out, train, nxt, fp_next, label, progress)
        tensors = {n: m.final_tensors(train.finalize) for n, m in learn.items()}
    finally:
        for n in mine:
            set_module(model, n, linears[n])
    report = BlockReport(i, len(mine), weights, counts, train.epochs * len(q), 0.0, float("nan"), loss_ref, epoch_losses)
    return report, tensors
