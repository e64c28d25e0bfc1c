"""ttq: activation-aware test-time quantization of LLM weights (Koike-Akino et al.).

Quick use::

    import ttq
    model, tok = ttq.models.load_model("path/or/hub-id")
    ttq.quantize_(model, ttq.TTQConfig(quant=ttq.QuantSpec(bits=3, group_size=32), rank=16))

Glossary (one word per concept, used the same way in every module):

===================  ==========================================================================
word                 meaning
===================  ==========================================================================
``s``, diagonal      the per-input-channel activation diagonal ``s`` (d_in,) of ``W diag(s)``
                     (:func:`ttq.methods.scaling.input_scale`); its hyper-parameters are a
                     ``ScaleSpec``, held in a config's ``scale`` field (names kept for
                     compatibility: "scale" alone never means ``s`` in new code)
scale, zero          the per-group quantization scale and zero point of the codes (d_out, n_groups)
codes                the integer (or codebook index) values of a quantized weight
group, group_size    consecutive input columns sharing one scale/zero (-1: a whole row)
format (``fmt``)     how codes map to values: int, nf4, fp4, nvfp4, mxfp4 (``QuantSpec.fmt``)
layout               how packed codes are laid out for a kernel (``cpu_q4``, ``cpu_q4_i8``, ...)
block                a decoder block of the model (``find_blocks``); nothing else
lazy-batch width     GPTQ's columns updated together (``GPTQConfig.block_size``, its paper's name)
tile                 a kernel's unit of work (the int8 activation tile of 32 columns)
parameter            the unit of quantization: ``(module name, parameter name, tensor)``
handler              turns a module and one of its parameters into the quantized module
method               a registered config class + handler (:mod:`ttq.registry`)
row                  one line of a results table: a method's config under a label
prefill, decode      prompt mode's two phases: quantize from the prompt, then one token at a time
real tokens          the tokens the attention mask marks as text (pads never enter ``s``)
===================  ==========================================================================
"""

import os as _os
import sys as _sys

# the ttq command's OpenMP wait: libgomp (PyTorch's OpenMP on Linux) spins this many times, ~30 µs, before a thread
# sleeps.  Long enough for the back-to-back regions of a decode step (SmolLM2, 2 threads: 109.98 tok/s against 61.40
# with OMP_WAIT_POLICY=PASSIVE, ttq bench --row), short enough that a thread whose core another process needs yields it
# (a TTQ forward beside a busy process: 5.59 s against 4.93 passive and 8.85 under libgomp's default 300000 spins);
# RESULTS "Stop 17".  Other OpenMP runtimes (macOS) read no GOMP_ variable: they get OMP_WAIT_POLICY=PASSIVE.
SPIN_COUNT = 3000


def openmp_choice(argv0: str, argv: list[str], environ, platform: str) -> dict[str, str]:
    """The OpenMP variables the ``ttq`` command (``argv0`` ``ttq``, or ``python -m ttq.cli``) sets: a short spin
    before idle threads sleep (``GOMP_SPINCOUNT``, :data:`SPIN_COUNT`; ``OMP_WAIT_POLICY=PASSIVE`` off Linux), none
    when the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` or for a library import.  A TTQ forward runs thousands
    of short parallel regions: threads that spin long turn each into a scheduler time slice when another process
    holds a core, threads that sleep at once make each region of a decode step pay a wake-up (README, "Threads")."""
    ours = _os.path.basename(argv0) == "ttq" or "ttq.cli" in argv
    if not ours or {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(environ):
        return {}
    return {"GOMP_SPINCOUNT": str(SPIN_COUNT)} if platform.startswith("linux") else {"OMP_WAIT_POLICY": "PASSIVE"}


def _command_line_defaults() -> tuple[str, ...]:
    """Sets :func:`openmp_choice`'s variables before PyTorch starts OpenMP; returns their names."""
    if "torch" in _sys.modules:
        return ()
    chosen = openmp_choice(_sys.argv[0] if _sys.argv else "", getattr(_sys, "orig_argv", _sys.argv), _os.environ,
                           _sys.platform)
    _os.environ.update(chosen)
    return tuple(chosen)


# the OpenMP variables ttq chose for this process: a baseline with OpenMP threads of its own (llama.cpp in ttq bench)
# then runs in a child process without them, under OpenMP's default as it would outside ttq
OMP_DEFAULTED = _command_line_defaults()

from ttq.config import METHODS, AWQConfig, CalibSpec, RTNConfig, TTQConfig, config_from_dict, config_to_dict
from ttq.quantizers.awp import AWPConfig
from ttq.quantizers.gptq import GPTQConfig
from ttq.formats.affine import QuantSpec
from ttq.methods.scaling import ScaleSpec
from ttq.patch.blocks import block_linears, find_blocks, walk
from ttq.patch.walker import name_filter, quantize_, restore_
from ttq.registry import register_handler, register_method, register_rows
from ttq import calibrate, compiled, models, options, runtime  # noqa: E402,F401  (ttq.models.load_model, ttq.runtime.set_mode)
from ttq.checkpoint import load_pretrained, save_pretrained  # registers quant_method "ttq" with transformers

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "AWQConfig",
    "AWPConfig",
    "GPTQConfig",
    "CalibSpec",
    "QuantSpec",
    "RTNConfig",
    "ScaleSpec",
    "TTQConfig",
    "block_linears",
    "config_from_dict",
    "config_to_dict",
    "find_blocks",
    "load_pretrained",
    "name_filter",
    "quantize_",
    "register_handler",
    "register_method",
    "register_rows",
    "restore_",
    "save_pretrained",
    "walk",
]
