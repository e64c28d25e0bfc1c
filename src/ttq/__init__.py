"""ttq: activation-aware test-time quantization of LLM weights (Koike-Akino et al.).

Quick use::

    import ttq
    model, tok = ttq.load_model("path/or/hub-id")
    ttq.quantize_(model, ttq.TTQConfig(quant=ttq.QuantSpec(bits=3, group_size=32), rank=16))
"""

from ttq.config import METHODS, AWQConfig, CalibSpec, RTNConfig, TTQConfig, config_from_dict, config_to_dict
from ttq.formats.affine import QuantSpec
from ttq.methods.scaling import ScaleSpec
from ttq.patch.blocks import block_linears, find_blocks, walk
from ttq.patch.walker import name_filter, quantize_, restore_
from ttq.registry import register_handler, register_method, register_rows
from ttq import calibrate, models, runtime  # noqa: E402,F401  (ttq.models.load_model, ttq.runtime.set_mode)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "AWQConfig",
    "CalibSpec",
    "QuantSpec",
    "RTNConfig",
    "ScaleSpec",
    "TTQConfig",
    "block_linears",
    "config_from_dict",
    "config_to_dict",
    "find_blocks",
    "name_filter",
    "quantize_",
    "register_handler",
    "register_method",
    "register_rows",
    "restore_",
    "walk",
]
