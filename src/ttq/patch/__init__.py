"""Model patching: the generic walker and activation capture."""

from ttq.patch.capture import LayerCalib, capture_inputs, collect_layer_stats
from ttq.patch.walker import (
    BLOCK_LIST_PATHS,
    HANDLERS,
    block_linears,
    find_blocks,
    name_filter,
    quantize_,
    register_handler,
    restore_,
)

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
]
