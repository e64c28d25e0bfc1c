"""Which tokens of a batch are real: the attention mask, seen by the test-time layers.

Test-time methods (TTQ, online AWP, test-time pruning and low-rank) take a statistic of the
activations of the tokens they are given.  In a padded batch the pad positions are not text: they
must not enter that statistic.  A linear layer never sees the attention mask, so
:func:`attach` puts a forward pre-hook on the model that records the ``attention_mask`` of every
call in a :class:`TokenMask` shared by the model's test-time layers (and clears it after the call);
a layer asks :meth:`TokenMask.rows` for the mask of its own input.
"""

from __future__ import annotations

import torch
import torch.nn as nn

ATTR = "_ttq_token_mask"


class TokenMask:
    """The real-token mask ``(B, T_total)`` of the call the model is running, or None."""

    def __init__(self) -> None:
        self.mask = None

    @property
    def mask(self) -> torch.Tensor | None:
        return self._mask

    @mask.setter
    def mask(self, mask: torch.Tensor | None) -> None:
        """The mask of a new call (None: no mask); forgets the per-length masks of the last call."""
        self._mask = mask
        self._rows: dict[tuple[int, torch.device], torch.Tensor | None] = {}

    def rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """``(B, T)`` bool mask of the tokens of a layer input ``x`` (B, T, d), or None when every
        token is real or no mask applies (no mask given, or shapes that are not the batch's).

        With a KV cache the mask spans past and current tokens; the current ones are its last T.
        Computed once per call (and length): every layer of the call shares it, so the all-real check
        (a host sync on GPU) is not repeated per layer.
        """
        m = self.mask
        if m is None or x.dim() != 3 or m.shape[0] != x.shape[0] or m.shape[1] < x.shape[1]:
            return None
        key = (x.shape[1], x.device)
        if key not in self._rows:
            m = m[:, m.shape[1] - x.shape[1]:]  # (B, T_total) -> (B, T)
            self._rows[key] = None if bool(m.all()) else m.to(x.device)
        return self._rows[key]


def _record(holder: TokenMask):
    def pre_hook(_module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]  # forward(input_ids, attention_mask, ...)
        holder.mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def clear(_module, _args, _kwargs, _out):
        holder.mask = None

    return pre_hook, clear


def attach(model: nn.Module) -> TokenMask:
    """The model's :class:`TokenMask`, installing the recording hooks on first use."""
    holder = getattr(model, ATTR, None)
    if holder is None:
        holder = TokenMask()
        pre_hook, clear = _record(holder)
        model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        model.register_forward_hook(clear, with_kwargs=True, always_call=True)
        object.__setattr__(model, ATTR, holder)  # a plain attribute, not a submodule or buffer
    return holder


def real_tokens(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``x`` (..., T, d) whose ``keep`` (..., T) is true, as (N, d); all of ``x`` when
    ``keep`` is None or selects nothing (an all-pad row still gets a finite statistic)."""
    if keep is None:
        return x
    real = x[keep]  # (..., T, d)[(..., T)] -> (N, d)
    return real if real.shape[0] else x
