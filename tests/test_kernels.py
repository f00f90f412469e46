"""quark/kernels.py: the int8 and int4 VNNI kernels against the float product of the dequantized weights, row
independence, odd shapes, the compiled-graph call, bad operands, and the fallback when they are switched off."""

import pytest
import torch

from quark import kernels
from quark.quantize import (
    Int4Linear,
    int4_dequantize,
    int4_linear,
    int8_linear,
    pack_nibbles,
    quantize_int4_tensor,
    quantize_tensor,
)

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="quark's CPU kernels need a CPU with AVX512-VNNI "
                                  "(and -BW, -VL) and a C++ compiler (g++) with ninja (pip install ninja)")


def _case(m: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q, s = quantize_tensor(torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g))
    x = torch.randn(m, k, generator=g) * torch.rand(1, k, generator=g) * 4  # uneven channels, as activations
    return x, q, s, x @ (q.float() * s[:, None]).T


@needs_kernel
@pytest.mark.parametrize("m,n,k", [(1, 512, 512), (1, 97, 1344), (3, 5, 688), (8, 2688, 512), (2, 7, 33),
                                   (32, 64, 100), (1, 1, 64), (200, 96, 512)])  # 200 rows: a short prefill
def test_int8_gemv_matches_dequantized_product(m, n, k):
    x, q, s, ref = _case(m, n, k)
    y = kernels.int8_gemv(x, q, s)
    assert y.shape == (m, n) and y.dtype == torch.float32
    # per-32 int8 activations: about 0.5% relative error (bounded at 2%; a wrong lane or tail gives ~100%)
    assert ((y - ref).norm() / ref.norm()).item() < 0.02
    # an exact check of the integer part: activations already on the int8 grid of each 32-block are exact
    xg = torch.zeros(m, k)
    for b in range(0, k, 32):
        d = torch.rand(m, 1) + 0.1
        xg[:, b:b + 32] = torch.randint(-127, 128, (m, min(32, k - b))).float() * d
        xg[:, b] = 127 * d[:, 0]  # the block's max sets d exactly
    exact = xg @ (q.float() * s[:, None]).T
    torch.testing.assert_close(kernels.int8_gemv(xg, q, s), exact, rtol=1e-4, atol=1e-5 * exact.abs().max().item())


@needs_kernel
def test_int8_gemv_rows_are_independent_and_zero_rows_give_zero():
    x, q, s, _ = _case(6, 300, 512)
    x[2] = 0
    y = kernels.int8_gemv(x, q, s)
    assert torch.equal(y[2], torch.zeros(300))
    for i in range(6):
        torch.testing.assert_close(y[i:i + 1], kernels.int8_gemv(x[i:i + 1], q, s), rtol=0, atol=0)


@needs_kernel
def test_int8_gemv_in_a_compiled_graph_and_through_int8_linear():
    x, q, s, _ = _case(1, 256, 512)
    f = torch.compile(lambda x, q, s: kernels.int8_gemv(torch.relu(x), q, s) * 2, fullgraph=True, dynamic=False)
    assert torch.equal(f(x, q, s), kernels.int8_gemv(torch.relu(x), q, s) * 2)
    x3 = x.reshape(1, 1, 512).bfloat16()  # int8_linear: leading dims and the compute dtype kept
    out = int8_linear(x3, q, s)
    assert out.shape == (1, 1, 256) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float()[0], kernels.int8_gemv(x3.reshape(1, 512), q, s).bfloat16().float())


@needs_kernel
def test_int8_gemv_rejects_bad_operands_with_a_clear_error():
    x, q, s, _ = _case(1, 8, 64)
    with pytest.raises(RuntimeError, match=r"x must be \(M, 64\)"):
        kernels.int8_gemv(torch.randn(1, 63), q, s)
    with pytest.raises(RuntimeError, match="w must be int8"):
        kernels.int8_gemv(x, q.float(), s)
    with pytest.raises(RuntimeError, match="scale must be float32"):
        kernels.int8_gemv(x, q, s[:4])


def test_switched_off_or_unsupported_cpu_falls_back(monkeypatch):
    monkeypatch.setenv("QUARK_CPU_KERNELS", "0")
    assert kernels._load() is False
    monkeypatch.setattr(kernels, "_LOADED", [False])
    x, q, s, ref = _case(1, 96, 64)
    assert ((int8_linear(x, q, s) - ref).norm() / ref.norm()).item() < 0.03  # torch's kernels


def _case4(m: int, n: int, k: int, group: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q, sz = quantize_int4_tensor(torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) + 0.3, group)
    qw = pack_nibbles(q)
    x = torch.randn(m, k, generator=g) * torch.rand(1, k, generator=g) * 4
    return x, qw, kernels.int4_table(sz, group), x @ int4_dequantize(qw, sz).T


@needs_kernel
@pytest.mark.parametrize("m,n,k,group", [(1, 512, 512, 32), (1, 97, 1344, 32), (3, 5, 1344, 64), (8, 2688, 512, 128),
                                         (2, 7, 96, 32), (1, 9, 160, 32), (32, 64, 256, 256), (200, 40, 512, 32)])
def test_int4_gemv_matches_dequantized_product(m, n, k, group):
    x, qw, table, ref = _case4(m, n, k, group)
    assert table.shape == (n, k // 32, 2) and table.dtype == torch.bfloat16
    y = kernels.int4_gemv(x, qw, table)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert ((y - ref).norm() / ref.norm()).item() < 0.02  # ~0.5%: per-32 int8 activations, weights exact
    for i in range(m):  # rows independent
        torch.testing.assert_close(y[i:i + 1], kernels.int4_gemv(x[i:i + 1], qw, table), rtol=0, atol=0)


@needs_kernel
def test_int4_linear_takes_the_kernel_through_the_module_and_a_compiled_graph():
    mod = Int4Linear.from_float(torch.randn(200, 512), group_size=64)
    assert mod.packed.dim() == 3  # the kernel's (scale, zero) table, not torch's packed weight
    x = torch.randn(1, 512)
    ref = x @ mod.dequantized().T
    assert ((mod(x) - ref).norm() / ref.norm()).item() < 0.02
    f = torch.compile(lambda x, *w: int4_linear(x, *w) + 1, fullgraph=True, dynamic=False)
    torch.testing.assert_close(f(x, mod.qweight, mod.scales_and_zeros, mod.packed), mod(x) + 1)


@needs_kernel
def test_int4_gemv_rejects_bad_operands_with_a_clear_error():
    x, qw, table, _ = _case4(1, 8, 128, 32)
    with pytest.raises(RuntimeError, match=r"x must be \(M, 128\)"):
        kernels.int4_gemv(torch.randn(1, 64), qw, table)
    with pytest.raises(RuntimeError, match="table must be bf16"):
        kernels.int4_gemv(x, qw, table.float())
    with pytest.raises(RuntimeError, match="multiple of 32"):
        kernels.int4_gemv(torch.randn(1, 48), qw[:, :24].contiguous(), table)


def test_build_folder_follows_torch_and_the_sources(tmp_path, monkeypatch):
    a, b = tmp_path / "a.cpp", tmp_path / "b.cpp"
    a.write_text("int x;")
    b.write_text("int x;")
    monkeypatch.setattr(kernels, "SOURCES", [a])
    first = kernels.build_directory()
    assert first == kernels.build_directory() and torch.__version__.split("+")[0] in first.name
    a.write_text("int y;")  # another version of the sources
    assert kernels.build_directory() != first
    monkeypatch.setattr(kernels, "SOURCES", [b])  # the same text in another checkout
    assert kernels.build_directory() != first


@needs_kernel
@pytest.mark.parametrize("m,n,k", [(1, 512, 512), (1, 97, 1344), (3, 5, 688), (8, 2688, 512), (5, 7, 33),
                                   (32, 64, 100), (1, 1, 16), (6, 3, 7)])
def test_f32_gemv_is_the_float_product(m, n, k):
    """quark::f32_gemv (float decode steps of quark::decode_layer) equals x @ w.T for any row count, output size
    (short tiles) and input size (masked tails), each row on its own."""
    g = torch.Generator().manual_seed(m * n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    y = kernels.f32_gemv(x, w)
    assert y.shape == (m, n) and y.dtype == torch.float32
    torch.testing.assert_close(y, (x.double() @ w.double().T).float(), rtol=1e-5, atol=1e-5 * k ** 0.5)
    for i in range(m):  # one row alone takes another summation order
        torch.testing.assert_close(y[i:i + 1], kernels.f32_gemv(x[i:i + 1], w), rtol=1e-5, atol=1e-5 * k ** 0.5)
    with pytest.raises(RuntimeError, match=r"x must be \(M, "):
        kernels.f32_gemv(torch.randn(1, k + 1), w)


@needs_kernel
def test_linears_take_the_kernels_up_to_kernel_rows():
    """A prompt of up to KERNEL_ROWS tokens runs quark's kernels (faster than dequantizing there, quantize.py);
    above that, dequantize + matmul."""
    from quark.quantize import KERNEL_ROWS

    x, q, s, ref = _case(KERNEL_ROWS + 1, 64, 256)
    m = KERNEL_ROWS
    torch.testing.assert_close(int8_linear(x[:m], q, s), kernels.int8_gemv(x[:m], q, s), rtol=0, atol=0)
    torch.testing.assert_close(int8_linear(x, q, s), ref, rtol=1e-5, atol=1e-4)  # dequantized: x not rounded
    mod = Int4Linear.from_float(torch.randn(48, 256), group_size=32)
    torch.testing.assert_close(mod(x[:m]), kernels.int4_gemv(x[:m], mod.qweight, mod.packed), rtol=0, atol=0)
    torch.testing.assert_close(mod(x), x @ mod.dequantized().T, rtol=1e-5, atol=1e-4)
