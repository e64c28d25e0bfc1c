"""Model patching: where the quantizable parameters are (blocks), the generic walker, activation capture,
the real-token mask of test-time layers."""

from ttq.patch.blocks import BLOCK_LIST_PATHS, block_linears, find_blocks, walk
from ttq.patch.capture import LayerCalib, capture_inputs, collect_layer_stats
from ttq.patch.walker import name_filter, quantize_, restore_
from ttq.registry import HANDLERS, register_handler

__all__ = [
    "BLOCK_LIST_PATHS",
    "HANDLERS",
    "LayerCalib",
    "block_linears",
    "capture_inputs",
    "collect_layer_stats",
    "find_blocks",
    "name_filter",
    "quantize_",
    "register_handler",
    "restore_",
    "walk",
]
