"""quark/kernels.py: every tier this CPU runs (avx512, avx2, portable) against the float product of the dequantized
weights and against the portable tier (the reference on every machine), row independence, odd shapes, bad operands,
the tier choice (QUARK_CPU_ISA) and the build folder."""

import pytest
import torch

from quark import kernels
from quark.quantize import (
    KERNEL_ROWS,
    Int4Linear,
    int4_dequantize,
    int8_linear,
    pack_nibbles,
    quantize_int4_tensor,
    quantize_tensor,
)

HERE = kernels.supported_tiers()


def _tier(name: str):
    """A tier to test: skipped where this CPU lacks its features (named) or no compiler built it."""
    if name not in HERE:
        return pytest.param(name, marks=pytest.mark.skip(
            reason=f"this CPU lacks {', '.join(sorted(kernels.NEEDS[name] - kernels.cpu_flags()))}"))
    return name


TIERS = [_tier(t) for t in kernels.TIERS]


@pytest.fixture(params=TIERS)
def tier(request):
    if kernels.ops(request.param) is None:
        pytest.skip(f"quark's {request.param} kernels could not be built here (no C++ compiler?)")
    return request.param


def _case(m: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q, s = quantize_tensor(torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g))
    x = torch.randn(m, k, generator=g) * torch.rand(1, k, generator=g) * 4  # uneven channels, as activations
    return x, q, s, x @ (q.float() * s[:, None]).T


def _close_to_portable(y: torch.Tensor, ref: torch.Tensor) -> None:
    """The same integer dot products: only the order of the float sums differs."""
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("m,n,k", [(1, 512, 512), (1, 97, 1344), (3, 5, 688), (8, 2688, 512), (2, 7, 33),
                                   (7, 64, 100), (1, 1, 64), (5, 576, 576), (200, 96, 512)])  # 200 rows: a prefill
def test_int8_gemv_matches_dequantized_product_and_portable(tier, m, n, k):
    x, q, s, ref = _case(m, n, k)
    y = kernels.int8_gemv(x, q, s, tier=tier)
    assert y.shape == (m, n) and y.dtype == torch.float32
    # per-32 int8 activations: about 0.5% relative error (bounded at 2%; a wrong lane or tail gives ~100%)
    assert ((y - ref).norm() / ref.norm()).item() < 0.02
    _close_to_portable(y, kernels.int8_gemv(x, q, s, tier="portable"))
    for i in range(min(m, 8)):  # rows independent
        torch.testing.assert_close(y[i:i + 1], kernels.int8_gemv(x[i:i + 1], q, s, tier=tier), rtol=1e-6, atol=1e-6)
    # an exact check of the integer part: activations already on the int8 grid of each 32-block are exact
    xg = torch.zeros(m, k)
    for b in range(0, k, 32):
        d = torch.rand(m, 1) + 0.1
        xg[:, b:b + 32] = torch.randint(-127, 128, (m, min(32, k - b))).float() * d
        xg[:, b] = 127 * d[:, 0]  # the block's max sets d exactly
    exact = xg @ (q.float() * s[:, None]).T
    torch.testing.assert_close(kernels.int8_gemv(xg, q, s, tier=tier), exact, rtol=1e-4,
                               atol=1e-5 * exact.abs().max().item())


def test_int8_gemv_zero_rows_give_zero_and_bad_operands_a_clear_error(tier):
    x, q, s, _ = _case(6, 300, 512)
    x[2] = 0
    assert torch.equal(kernels.int8_gemv(x, q, s, tier=tier)[2], torch.zeros(300))
    x, q, s, _ = _case(1, 8, 64)
    with pytest.raises(RuntimeError, match=r"x must be \(M, 64\)"):
        kernels.int8_gemv(torch.randn(1, 63), q, s, tier=tier)
    with pytest.raises(RuntimeError, match="w must be int8"):
        kernels.int8_gemv(x, q.float(), s, tier=tier)
    with pytest.raises(RuntimeError, match="scale must be float32"):
        kernels.int8_gemv(x, q, s[:4], tier=tier)


def _case4(m: int, n: int, k: int, group: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q, sz = quantize_int4_tensor(torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) + 0.3, group)
    qw = pack_nibbles(q)
    x = torch.randn(m, k, generator=g) * torch.rand(1, k, generator=g) * 4
    return x, qw, kernels.int4_table(sz, group), x @ int4_dequantize(qw, sz).T


@pytest.mark.parametrize("m,n,k,group", [(1, 512, 512, 32), (1, 97, 1344, 32), (3, 5, 1344, 64), (8, 2688, 512, 128),
                                         (2, 7, 96, 32), (1, 9, 160, 32), (7, 64, 256, 256), (5, 576, 576, 32),
                                         (200, 40, 512, 32)])
def test_int4_gemv_matches_dequantized_product_and_portable(tier, m, n, k, group):
    x, qw, table, ref = _case4(m, n, k, group)
    assert table.shape == (n, k // 32, 2) and table.dtype == torch.bfloat16
    y = kernels.int4_gemv(x, qw, table, tier=tier)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert ((y - ref).norm() / ref.norm()).item() < 0.02  # ~0.5%: per-32 int8 activations, weights exact
    _close_to_portable(y, kernels.int4_gemv(x, qw, table, tier="portable"))
    for i in range(min(m, 8)):  # rows independent
        torch.testing.assert_close(y[i:i + 1], kernels.int4_gemv(x[i:i + 1], qw, table, tier=tier), rtol=1e-6,
                                   atol=1e-6)


def test_int4_gemv_rejects_bad_operands_with_a_clear_error(tier):
    x, qw, table, _ = _case4(1, 8, 128, 32)
    with pytest.raises(RuntimeError, match=r"x must be \(M, 128\)"):
        kernels.int4_gemv(torch.randn(1, 64), qw, table, tier=tier)
    with pytest.raises(RuntimeError, match="table must be bf16"):
        kernels.int4_gemv(x, qw, table.float(), tier=tier)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        kernels.int4_gemv(torch.randn(1, 48), qw[:, :24].contiguous(), table, tier=tier)


@pytest.mark.parametrize("m,n,k", [(1, 512, 512), (1, 97, 1344), (3, 5, 688), (8, 2688, 512), (5, 7, 33),
                                   (7, 64, 100), (1, 1, 16), (6, 3, 7), (2, 576, 576), (4, 70, 9)])
def test_f32_gemv_is_the_float_product(tier, m, n, k):
    """Any row count, output size (a last narrower block) and input size, each row on its own, W `f32_pack`ed."""
    g = torch.Generator().manual_seed(m * n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    packed = kernels.f32_pack(w)
    assert packed.shape == w.shape and not (n > kernels.F32_BLOCK and torch.equal(packed, w))
    y = kernels.f32_gemv(x, packed, tier=tier)
    assert y.shape == (m, n) and y.dtype == torch.float32
    torch.testing.assert_close(y, (x.double() @ w.double().T).float(), rtol=1e-5, atol=1e-5 * k ** 0.5)
    for i in range(m):  # one row alone may take another summation order
        torch.testing.assert_close(y[i:i + 1], kernels.f32_gemv(x[i:i + 1], packed, tier=tier), rtol=1e-5,
                                   atol=1e-5 * k ** 0.5)
    with pytest.raises(RuntimeError, match=r"x must be \(M, "):
        kernels.f32_gemv(torch.randn(1, k + 1), packed, tier=tier)


def test_linears_take_the_kernels_up_to_kernel_rows():
    """A prompt of up to KERNEL_ROWS tokens runs quark's kernels (faster than dequantizing there, quantize.py);
    above that, and with QUARK_CPU_ISA=torch, dequantize + matmul."""
    if not kernels.available():
        pytest.skip("quark's kernels do not run here")
    x, q, s, ref = _case(KERNEL_ROWS + 1, 64, 256)
    m = KERNEL_ROWS
    torch.testing.assert_close(int8_linear(x[:m], q, s), kernels.int8_gemv(x[:m], q, s), rtol=0, atol=0)
    torch.testing.assert_close(int8_linear(x, q, s), ref, rtol=1e-5, atol=1e-4)  # dequantized: x not rounded
    mod = Int4Linear.from_float(torch.randn(48, 256), group_size=32)
    torch.testing.assert_close(mod(x[:m]), kernels.int4_gemv(x[:m], mod.qweight, mod.table), rtol=0, atol=0)
    torch.testing.assert_close(mod(x), x @ mod.dequantized().T, rtol=1e-5, atol=1e-4)


def test_tier_choice(monkeypatch):
    """auto picks the fastest tier this CPU runs; a forced tier it lacks is an error naming the missing features and
    the allowed values; torch means no kernels (eager torch, as with no compiler)."""
    assert HERE[-1] == "portable" and kernels.chosen_tier() == HERE[0]
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2", "fma", "sse4_2"})
    assert kernels.supported_tiers() == ["avx2", "portable"]
    monkeypatch.setenv("QUARK_CPU_ISA", "avx512")
    with pytest.raises(ValueError, match="QUARK_CPU_ISA=avx512: this CPU lacks avx512_vnni, avx512bw, avx512f, "
                                         "avx512vl; allowed here: avx2, portable, torch"):
        kernels.chosen_tier()
    monkeypatch.setenv("QUARK_CPU_ISA", "sse")
    with pytest.raises(ValueError, match="allowed values are auto, avx512, avx2, portable, torch"):
        kernels.chosen_tier()
    monkeypatch.setenv("QUARK_CPU_ISA", "Portable")
    assert kernels.chosen_tier() == "portable"
    monkeypatch.setenv("QUARK_CPU_ISA", "torch")
    assert kernels.chosen_tier() is None and not kernels.available()
    x, q, s, ref = _case(1, 96, 64)
    assert ((int8_linear(x, q, s) - ref).norm() / ref.norm()).item() < 0.02  # eager torch: bf16 activations
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2", "fma", "avx_vnni"})
    assert "-mavxvnni" in kernels.compile_flags("avx2") and "-mavxvnni" not in kernels.compile_flags("portable")


def test_build_folder_follows_tier_torch_and_the_sources(tmp_path, monkeypatch):
    first = kernels.build_directory("portable")
    assert first == kernels.build_directory("portable") and torch.__version__.split("+")[0] in first.name
    assert first.name.startswith("quark_portable-") and kernels.build_directory("avx2") != first
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    for f in ("portable.cpp", "layer.h"):
        (csrc / f).write_bytes((kernels.CSRC / f).read_bytes())
    monkeypatch.setattr(kernels, "CSRC", csrc)  # the same text in another checkout
    assert kernels.build_directory("portable") != first
    other = kernels.build_directory("portable")
    (csrc / "layer.h").write_text("// another version")
    assert kernels.build_directory("portable") != other
