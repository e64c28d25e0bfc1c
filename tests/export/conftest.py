"""Fixtures of the export tests: ``ttq.export.register()`` adds a format (``int_zp``) and a method
(``ttq_snapshot``) to the global tables; every test here gets them and leaves the tables as it found them
(other tests compare the tables with the built-ins)."""

from __future__ import annotations

import pytest

from ttq import registry
from ttq.formats import registry as formats


@pytest.fixture(autouse=True)
def export_tables():
    """The export's registrations for the duration of one test, then the tables as they were."""
    saved = (dict(formats._FORMATS), dict(registry.METHODS), dict(registry.HANDLERS), dict(registry.KINDS),
             list(registry._ORDER))
    import ttq.export

    ttq.export.register()
    yield
    for table, old in zip((formats._FORMATS, registry.METHODS, registry.HANDLERS, registry.KINDS), saved):
        table.clear()
        table.update(old)
    registry._ORDER[:] = saved[4]


def ids(seed: int = 0, batch: int = 2, length: int = 24):
    """Token ids of stories260K's vocabulary."""
    import torch

    return torch.randint(3, 500, (batch, length), generator=torch.Generator().manual_seed(seed))


def calibration(model):
    """Per-layer statistics of a few random windows (stands in for a calibration set)."""
    import torch

    import ttq
    from ttq.patch.capture import collect_layer_stats

    windows = torch.randint(3, 500, (4, 64), generator=torch.Generator().manual_seed(7))
    return collect_layer_stats(model, ttq.block_linears(model), windows, 2.0)
