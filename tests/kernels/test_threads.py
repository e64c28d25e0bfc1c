"""Small-batch (decode) products split across threads: bit-identical outputs for every thread count, layout
and token count (each output row is computed by one thread with the same code), and the reference's values."""

from __future__ import annotations

import pytest
import torch

from ttq.formats.affine import QuantSpec
from ttq.kernels import cpu_build
from ttq.kernels.api import pack_linear, select_layout
from ttq.kernels.reference import dequantize_packed

pytestmark = pytest.mark.skipif(not cpu_build.load(), reason="ttq C++ kernels unavailable")

LAYOUTS = [("cpu_q2", 2), ("cpu_q3", 3), ("cpu_q4", 4), ("cpu_q8", 8), ("cpu_q4_i8", 4), ("cpu_q8_i8", 6)]


@pytest.fixture()
def threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("layout,bits", LAYOUTS)
@pytest.mark.parametrize("tokens", [1, 3, 7])
@pytest.mark.parametrize("shape", [(1040, 160), (2064, 192), (40, 128)])
def test_products_are_bit_identical_for_any_thread_count(threads, layout, bits, tokens, shape):
    spec = QuantSpec(bits=bits, group_size=32)
    try:
        select_layout(spec, shape, "cpu", torch.float32, layout)
    except ValueError as e:
        pytest.skip(str(e))
    g = torch.Generator().manual_seed(tokens)
    w = torch.randn(*shape, generator=g)
    s = torch.rand(shape[1], generator=g) + 0.5
    bias = torch.randn(shape[0], generator=g)
    lin = pack_linear(w, s, spec, bias, layout=layout, half_params=True)
    x = torch.randn(tokens, shape[1], generator=g)
    outs = []
    for t in (1, 2, 3):
        torch.set_num_threads(t)
        outs.append([lin(x) for _ in range(3)])
    for run in outs[1:] + [outs[0][1:]]:
        for y in run:
            assert torch.equal(y, outs[0][0])
    ref = (x / s) @ dequantize_packed(lin.packed).T + bias  # the dequantize-then-matmul oracle
    rel = float((outs[0][0] - ref).norm() / ref.norm())
    assert rel < (2e-2 if layout.endswith("_i8") else 1e-5)


def test_the_extension_is_built_with_openmp():
    """at::parallel_for splits work only in code compiled with OpenMP: the built library calls libgomp's
    GOMP_parallel (before stop 16 it was built without -fopenmp and every product ran on one thread)."""
    name = cpu_build.build_name()
    so = cpu_build.cache_dir() / name / f"{name}.so"
    assert "-fopenmp" in cpu_build.CFLAGS and b"GOMP_parallel" in so.read_bytes()
