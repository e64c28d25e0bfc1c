"""Intra-op threads for short operations on a shared CPU.

PyTorch runs each elementwise op or reduction over more than 32768 elements as one OpenMP
parallel region.  When another process keeps a core busy, the region's thread on that core is
often descheduled, and the others wait for it at the region's closing barrier (spinning first,
which also costs them the scheduler's favour), so each region can take a scheduler time slice
(milliseconds) instead of microseconds.  Work made of many short regions suffers most: the
eager per-layer quantization of a per-sequence TTQ forward (~22 regions per linear layer) ran
~13x slower next to one busy process on a 2-core machine, while ``F.linear`` ran ~3x slower.

:func:`single_threaded_below` runs a block of such small ops on the calling thread alone; the
fused kernels of :mod:`ttq.kernels.cpu_codes` avoid the regions altogether.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Below this many elements per op, splitting across threads saves less than a barrier wait can
# cost next to a busy process (a few ms); above it the work per thread outweighs the wait.
MIN_PARALLEL_ELEMENTS = 1 << 22


@contextlib.contextmanager
def single_threaded_below(numel: int, min_parallel: int = MIN_PARALLEL_ELEMENTS) -> Iterator[None]:
    """Run the block with one intra-op thread when ``numel < min_parallel``; restore the count after.

    Args:
        numel: the number of elements the block's largest op works on.
        min_parallel: the size from which the block keeps PyTorch's thread count.
    """
    n = torch.get_num_threads()
    if n == 1 or numel >= min_parallel:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
