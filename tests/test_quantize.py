"""int8 and int4 weight-only quantization: error bounds, closeness to fp32, perplexity budgets (int8 2%, int4 3%
on a toy Markov model; real text in dev/LOG.md), fast path, CLI."""

import copy
import math

import pytest
import torch

from quark import Quark, kernels
from quark.config import PRESETS
from quark.generate import generate
from quark.quantize import (
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    int4_dequantize,
    int4_linear,
    int4_pack_for_torch,
    int8_linear,
    is_quantized,
    model_nbytes,
    pack_nibbles,
    quantize_int4,
    quantize_int4_tensor,
    quantize_int8,
    quantize_tensor,
    unpack_nibbles,
)


def _markov_batches(vocab: int, n: int, B: int, T: int, seed: int):
    """Token streams from a sparse random Markov chain (4 successors per token): learnable structure."""
    succ = torch.randint(1, vocab, (vocab, 4), generator=torch.Generator().manual_seed(0))  # one chain
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.empty(B, T + 1, dtype=torch.long)
        x[:, 0] = torch.randint(1, vocab, (B,), generator=g)
        for t in range(T):
            x[:, t + 1] = succ[x[:, t], torch.randint(0, 4, (B,), generator=g)]
        yield x[:, :-1], x[:, 1:]


@pytest.fixture(scope="module")
def trained():
    """The test preset trained for a few seconds so its logits are peaked like a real model's."""
    torch.manual_seed(0)
    cfg = PRESETS["test"]
    m = Quark(cfg).init_weights(seed=0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    for x, y in _markov_batches(cfg.vocab_size, 80, 8, 48, seed=1):
        loss = m.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    held_out = list(_markov_batches(cfg.vocab_size, 4, 16, 64, seed=2))
    return m, held_out


def test_quantize_tensor_error_bound():
    w = torch.randn(37, 53) * torch.rand(37, 1) * 3
    q, s = quantize_tensor(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and s.shape == (37,)
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-6).all()
    assert (q.abs().amax(1) == 127).all()  # each row uses the full range


@pytest.mark.parametrize("rows", [1, 5, 100])
def test_int8_linear_kernel_and_dequant_paths_agree(rows):
    w = torch.randn(96, 64) * 0.05
    q, s = quantize_tensor(w)
    x = torch.randn(rows, 64)
    ref = x @ (q.float() * s[:, None]).T
    got = int8_linear(x, q, s)
    assert got.dtype == torch.float32 and got.shape == (rows, 96)
    assert ((got - ref).norm() / ref.norm()).item() < 0.01  # int8 activations (quark's kernel) or none (dequantized)


def test_int8_one_row_decode_matches_fp32_greedy_and_fast_equals_plain(trained):
    """Batch-1 decoding keeps fp32's greedy tokens on the trained model,
    and the fused fast path equals the module path."""
    m, held_out = trained
    q = quantize_int8(copy.deepcopy(m))
    same = 0
    for i in range(4):
        prompt = held_out[0][0][i, :8].tolist()
        ref = generate(m, [prompt], max_new_tokens=16, temperature=0.0)
        fast = generate(q, [prompt], max_new_tokens=16, temperature=0.0, fast=True)
        assert fast == generate(q, [prompt], max_new_tokens=16, temperature=0.0, fast=False)
        same += ref[0][:8] == fast[0][:8]
    assert same >= 3


def test_quantized_model_structure_and_size():
    m = quantize_int8(Quark(PRESETS["test"]).init_weights(seed=1))
    assert is_quantized(m) and m.dtype == torch.float32
    assert isinstance(m.model.embed_tokens, Int8Embedding) and isinstance(m.lm_head, Int8Linear)
    assert m.lm_head.weight is m.model.embed_tokens.weight  # tied: one int8 table
    assert not any(isinstance(mod, torch.nn.Linear) for mod in m.modules())
    fp32 = model_nbytes(Quark(PRESETS["test"]))
    assert model_nbytes(m) < 0.35 * fp32  # int8 weights + fp32 scales, norms and RoPE tables
    assert quantize_int8(m) is m  # idempotent


def test_int8_logits_close_and_perplexity_within_2_percent(trained):
    m, held_out = trained
    q = quantize_int8(copy.deepcopy(m))
    with torch.no_grad():
        x, _ = held_out[0]
        a, b = m(x[:2, :16]), q(x[:2, :16])  # small batch: the int8 kernel path
        assert ((a - b).norm() / a.norm()).item() < 0.05
        assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9
        lf = sum(m.loss(x, y).item() for x, y in held_out) / len(held_out)
        lq = sum(q.loss(x, y).item() for x, y in held_out) / len(held_out)
    assert lf < math.log(m.config.vocab_size) - 2.0, "the fixture model did not learn the chain"
    print(f"val loss fp32 {lf:.4f} int8 {lq:.4f} ppl ratio {math.exp(lq - lf):.4f}")
    assert math.exp(lq - lf) < 1.02, f"int8 perplexity {math.exp(lq):.3f} vs fp32 {math.exp(lf):.3f}"


def test_int8_greedy_tokens_mostly_equal_fp32_and_fast_equals_plain(trained):
    m, held_out = trained
    q = quantize_int8(copy.deepcopy(m))
    prompts = [held_out[0][0][i, :8].tolist() for i in range(4)]
    ref = generate(m, prompts, max_new_tokens=24, temperature=0.0)
    fast = generate(q, prompts, max_new_tokens=24, temperature=0.0, fast=True)
    plain = generate(q, prompts, max_new_tokens=24, temperature=0.0, fast=False)
    assert fast == plain
    first = [r[:8] == f[:8] for r, f in zip(ref, fast)]
    assert sum(first) >= 3, (ref, fast)


def test_quantize_cli_reports_size_and_speed(tmp_path, capsys):
    import json

    import numpy as np

    from quark.cli import main
    from quark.weights import save_model

    save_model(Quark(PRESETS["test"]).init_weights(seed=2), tmp_path / "m")
    data = tmp_path / "data"
    (data / "val").mkdir(parents=True)
    np.save(data / "val" / "shard_00000.npy", np.arange(3000, dtype=np.uint16) % 500)
    (data / "manifest.json").write_text(json.dumps({"kind": "pretrain", "splits": {
        "train": {"shards": []}, "val": {"shards": ["shard_00000.npy"], "tokens": 3000, "bytes": 6000}}}))
    args = ["quantize", "--model", str(tmp_path / "m"), "--tokens", "8", "--data", str(data), "--eval-tokens", "1024"]
    assert main(args) in (0, None)
    report = json.loads(capsys.readouterr().out)
    assert report["int8_bytes"] < 0.35 * report["fp32_bytes"]
    assert report["int8_decode_tok_per_s"] > 0
    assert abs(report["ppl_ratio"] - 1) < 0.02 and report["fp32_val_loss"] > 5  # random weights: ~ln(514)
    assert abs(report["decode_ppl_ratio"] - 1) < 0.02 and report["int8_decode_val_loss"] > 5
    from quark.quantize_cli import decode_loss, val_loss  # token-by-token decoding scores what a forward does

    m = Quark(PRESETS["test"]).init_weights(seed=2).eval()
    assert abs(decode_loss(m, data, 512, seq_len=128) - val_loss(m, data, 128, seq_len=128)) < 1e-4  # 4 windows
    assert main(["quantize", "--model", str(tmp_path / "m"), "--data", str(tmp_path)]) == 2  # not a data folder


# ---- int4 ----------------------------------------------------------------------------------------------------------
def test_int4_tensor_error_bound_and_nibbles_round_trip():
    w = torch.randn(24, 96) * torch.rand(24, 1) * 3 + torch.rand(24, 1)  # rows with an offset: asymmetric groups
    q, sz = quantize_int4_tensor(w, 32)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and sz.shape == (3, 24, 2) and sz.dtype == torch.bfloat16
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)
    deq = int4_dequantize(pack_nibbles(q), sz)
    s, z = sz.float()[..., 0].T, sz.float()[..., 1].T  # (24, 3)
    ref = (q.float().view(24, 3, 32) - 8) * s[..., None] + z[..., None]  # the kernel's convention, by hand
    torch.testing.assert_close(deq, ref.view(24, 96))
    # half a step, plus what bf16 rounding of the group's minimum (zero - 8 scale) can add
    lo = w.view(24, 3, 32).amin(-1)
    assert ((deq - w).abs().view(24, 3, 32) <= s[..., None] * 0.51 + (lo.abs() * 2**-8)[..., None]).all()
    with pytest.raises(ValueError, match="not a multiple of group_size=32"):
        quantize_int4_tensor(torch.randn(4, 48), 32)


@pytest.mark.parametrize("ours", [True, False])  # quark's kernel where it runs, else torch's (or dequantized)
@pytest.mark.parametrize("rows", [1, 5, 100])
def test_int4_linear_kernel_and_dequant_paths_agree(rows, ours, monkeypatch):
    if not ours:
        monkeypatch.setenv("QUARK_CPU_ISA", "torch")
    w = torch.randn(96, 128) * 0.05
    q, sz = quantize_int4_tensor(w, 32)
    qw = pack_nibbles(q)
    x = torch.randn(rows, 128)
    ref = x @ int4_dequantize(qw, sz).T
    got = int4_linear(x, qw, sz, kernels.int4_table(sz, 32), int4_pack_for_torch(qw))
    assert got.dtype == torch.float32 and got.shape == (rows, 96)
    assert ((got - ref).norm() / ref.norm()).item() < 0.01  # int8 activations (quark's) or none


def test_int4_model_structure_and_fallbacks():
    m = quantize_int4(Quark(PRESETS["test"]).init_weights(seed=1))
    assert is_quantized(m) and m.dtype == torch.float32
    assert isinstance(m.model.layers[0].mlp.down_proj, Int4Linear) and isinstance(m.lm_head, Int8Linear)
    assert m.lm_head.weight is m.model.embed_tokens.weight  # tied: one int8 table, as q4_0 exports keep it q8_0
    def saved(model):  # persistent state only (the kernels' table is rebuilt from the scales)
        return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())

    int8 = quantize_int8(Quark(PRESETS["test"]))
    linears = sum(t.numel() for n, t in int8.state_dict().items() if n.endswith("proj.weight"))
    assert saved(int8) - saved(m) > 0.3 * linears  # 0.5 byte + a bf16 scale and zero per 32 weights, vs 1 byte
    tiny = quantize_int4(Quark(PRESETS["tiny"]))  # d_ff=688 is not a multiple of 32: down_proj stays int8
    assert isinstance(tiny.model.layers[0].mlp.down_proj, Int8Linear)
    assert isinstance(tiny.model.layers[0].mlp.up_proj, Int4Linear)
    with pytest.raises(ValueError, match="allowed values are 32, 64, 128, 256"):
        quantize_int4(Quark(PRESETS["test"]), group_size=16)


def test_int4_perplexity_and_fast_path(trained):
    m, held_out = trained
    q = quantize_int4(copy.deepcopy(m))
    with torch.no_grad():
        x, _ = held_out[0]
        a, b = m(x[:2, :16]), q(x[:2, :16])
        assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.8
        lf = sum(m.loss(x, y).item() for x, y in held_out) / len(held_out)
        lq = sum(q.loss(x, y).item() for x, y in held_out) / len(held_out)
    print(f"val loss fp32 {lf:.4f} int4 {lq:.4f} ppl ratio {math.exp(lq - lf):.4f}")
    assert math.exp(lq - lf) < 1.03, f"int4 perplexity {math.exp(lq):.3f} vs fp32 {math.exp(lf):.3f}"
    prompts = [held_out[0][0][i, :8].tolist() for i in range(4)]
    fast = generate(q, prompts, max_new_tokens=16, temperature=0.0, fast=True)  # fused q/k/v and gate/up nibbles
    assert fast == generate(q, prompts, max_new_tokens=16, temperature=0.0, fast=False)


def test_quantize_cli_int4(tmp_path, capsys):
    import json

    from quark.cli import main
    from quark.weights import save_model

    save_model(Quark(PRESETS["test"]).init_weights(seed=2), tmp_path / "m")
    assert main(["quantize", "--model", str(tmp_path / "m"), "--tokens", "8", "--bits", "4"]) in (0, None)
    report = json.loads(capsys.readouterr().out)
    assert report["int4_bytes"] < report["fp32_bytes"] and report["int4_decode_tok_per_s"] > 0


@pytest.mark.parametrize("bits", [8, 4])
def test_fast_path_follows_load_state_dict_of_quantized_model(bits):
    """Quantized weights are buffers (no optimizer touches them); a load_state_dict into the quantized model is
    seen by the next fast decoder's fused copies, and by int4's kernel table (derived, not in the state dict)."""
    from quark.fast import decoder_for

    make = quantize_int8 if bits == 8 else quantize_int4
    a = make(Quark(PRESETS["test"]).init_weights(seed=1).eval())
    b = make(Quark(PRESETS["test"]).init_weights(seed=2).eval())
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])

    def fast_logits(m):  # two rows and one row
        return torch.cat([decoder_for(m, 2, 8).prefill(idx), decoder_for(m, 1, 8).prefill(idx[:1, :1])])

    before = fast_logits(a)
    with torch.no_grad():
        a(idx[:1, :1])  # the modules' own one-row copies exist before the load
    a.load_state_dict(b.state_dict())
    with torch.no_grad():  # the modules first (before the fast path's refresh touches them)
        assert torch.allclose(a(idx[:1, :1]), b(idx[:1, :1]), atol=1e-5)
    after = fast_logits(a)
    assert torch.allclose(after, fast_logits(b), atol=1e-5)
    assert not torch.allclose(after, before, atol=1e-3)
    with torch.no_grad():  # the modules themselves: int4's kernel table is derived, rebuilt on load
        assert torch.allclose(a(idx)[:, -1], b(idx)[:, -1], atol=1e-5)
