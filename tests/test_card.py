"""The generated model card: every figure checked against its source (weights, config, manifest, run.json,
metrics.jsonl, eval JSON), the front matter parsed as YAML, and no number in the card without a source."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from quark import Quark
from quark.config import PRESETS
from quark.hf.card import MIT_LICENSE, card_facts, render_model_card
from quark.hf.export import RECOMMENDED, export
from quark.weights import read_safetensors, save_model

NUM = re.compile(r"(?<![\w.:#/-])\d(?:[\d,]*\d)?(?:\.\d+)?(?![\w])")


def _manifest(kind, sources, seq_len=None):
    m = {"kind": kind, "tokenizer_sha256": "ab12" * 16, "vocab_size": 514, "seed": 1234, "dtype": "uint16",
         "sources": sources, "eval_dedup_removed": 3, "created": "2026-11-27T09:00:00Z",
         "splits": {"train": {"shards": ["shard_00000.npy", "shard_00001.npy"], "tokens": 91_234, "bytes": 401_777},
                    "val": {"shards": ["shard_00000.npy"], "tokens": 4_321, "bytes": 17_003}}}
    if seq_len:
        m["seq_len"] = seq_len
    return m


def _make_run(root: Path, kind, steps, base, manifest, tokenizer, seed, ck_steps):
    cfg = PRESETS["test"]
    for s in ck_steps:
        ck = root / "checkpoints" / f"step_{s:06d}"
        save_model(Quark(cfg).init_weights(seed=seed + s), ck)
        tokenizer.save(ck)
    tpl = 2048  # tokens per step in this fake run
    train = [{"step": s, "tokens": s * tpl, "loss": 6.0 - 0.0917 * s, "lr": 3e-4, "grad_norm": 1.25,
              "tok_per_s": 15_432.7 + s, "mfu": 0.0123, "elapsed_s": 3.5 * s} for s in range(1, steps + 1)]
    val = [{"step": s, "val_loss": 5.5 - 0.0731 * s, "val_bpb": 2.2 - 0.011 * s if kind == "pretrain" else None}
           for s in range(5, steps + 1, 5)]  # as the training loop writes them: SFT has no bits per byte
    lines = sorted(train + val, key=lambda d: (d["step"], "val_loss" in d))
    (root / "metrics.jsonl").write_text("".join(json.dumps(d) + "\n" for d in lines))
    run = {"kind": kind, "train_config": {"lr": 3e-4, "batch_size": 8, "seq_len": 256, "schedule": "cosine",
                                          "betas": [0.9, 0.95]},
           "model_config": cfg.to_dict(), "data": str(root / "data"), "data_manifest": manifest, "base": base,
           "hardware": "2x Fake CPU cores", "world_size": 1, "started": "2026-11-27T10:00:00Z",
           "finished": "2026-11-27T11:02:05Z", "wall_time_s": 3725.4, "steps": steps, "tokens": steps * tpl}
    (root / "run.json").write_text(json.dumps(run, indent=2))
    return run, train, val


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("runs")
    pre_sources = [
        {"name": "debian-handbook", "weight": 0.6, "license": "GPL-2+ / CC-BY-SA-3.0", "documents": 120,
         "tokens": 61_000, "bytes": 250_123},
        {"name": "HuggingFaceTB/smollm-corpus", "weight": 0.4, "license": "ODC-By", "documents": 77,
         "tokens": 30_234, "bytes": 151_654}]
    base_run, base_train, base_val = _make_run(root / "base", "pretrain", 40, None, _manifest("pretrain", pre_sources),
                               tiny_tokenizer, 0, [40])
    base_ck = root / "base" / "checkpoints" / "step_000040"
    sft_sources = [{"name": "chatterbot-corpus", "weight": 1.0, "license": "BSD-3-Clause", "documents": 2562,
                    "tokens": 95_555, "bytes": 388_001}]
    run, train, val = _make_run(root / "sft", "sft", 30, str(base_ck), _manifest("sft", sft_sources, seq_len=256),
                                tiny_tokenizer, 100, [15, 30])
    ev = {"model": "x", "date": "2026-11-27", "limit": 200, "fewshot": 0,
          "tasks": {"piqa": {"acc": 0.6112, "acc_stderr": 0.0114, "acc_norm": 0.6021, "acc_norm_stderr": 0.0115,
                             "n": 1838, "chance": 0.5, "split": "validation"},
                    "arc_easy": {"acc": 0.2631, "acc_stderr": 0.0184, "acc_norm": 0.2543, "acc_norm_stderr": 0.0182,
                                 "n": 570, "chance": 0.25, "split": "validation"},
                    "lambada": {"acc": 0.0312, "acc_stderr": 0.0077, "acc_norm": None, "acc_norm_stderr": None,
                                "n": 500, "chance": None, "split": "test"}},
          "perplexity": {"val_loss": 3.8765, "bpb": 1.4321, "tokens": 4321}}
    (root / "sft" / "checkpoints" / "step_000030" / "eval_results.json").write_text(json.dumps(ev))
    return {"root": root, "run": run, "train": train, "val": val, "base_run": base_run, "base_ck": base_ck,
            "base_train": base_train, "base_val": base_val,
            "eval": ev, "pre_sources": pre_sources, "sft_sources": sft_sources}


@pytest.fixture(scope="module")
def card(runs):
    return render_model_card(runs["root"] / "sft", name="Quark-Test-Instruct")


def _front(card):
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_front_matter_parses_and_says_what_the_hub_needs(card, runs):
    fm = _front(card)
    assert fm["license"] == "mit" and fm["language"] == ["en", "it"]
    assert fm["library_name"] == "transformers" and fm["pipeline_tag"] == "text-generation"
    assert "quark" in fm["tags"] and "conversational" in fm["tags"]
    assert "base_model" not in fm and str(runs["root"]) not in card  # no local path: the Hub wants an id
    assert fm["datasets"] == ["HuggingFaceTB/smollm-corpus"]  # the only source with a Hub id
    named = render_model_card(runs["root"] / "sft", name="Quark-Test-Instruct", base_model="ThingAI/Quark-72M")
    assert _front(named)["base_model"] == "ThingAI/Quark-72M" and "| Finetuned from | `ThingAI/Quark-72M` |" in named
    with pytest.raises(ValueError, match="Hub model id such as org/name"):
        render_model_card(runs["root"] / "sft", base_model=str(runs["root"] / "base"))


def test_parameters_and_architecture_come_from_weights_and_config(card, runs):
    ck = runs["root"] / "sft" / "checkpoints" / "step_000030"
    n = sum(t.numel() for t in read_safetensors(ck / "model.safetensors").values())
    cfg = PRESETS["test"]
    assert n == cfg.n_params()
    assert f"| Parameters | {n:,} ({n / 1e6:.1f}M, embedding-tied) |" in card
    for row in (f"| Layers | {cfg.n_layers} |", f"| Hidden size (d_model) | {cfg.d_model} |",
                f"| Attention heads | {cfg.n_heads} query heads |",
                f"| KV heads | {cfg.n_kv_heads} (Grouped-Query Attention, {cfg.n_heads // cfg.n_kv_heads}:1 ratio) |",
                f"| Head dimension | {cfg.head_dim} |", f"| Feed-forward | SwiGLU, d_ff = {cfg.d_ff} |",
                f"| Context length | {cfg.context_length} tokens |",
                f"| Vocabulary size | {cfg.vocab_size - 2} (+ 2 chat tokens) = {cfg.vocab_size} embedding rows |"):
        assert row in card, row


def test_data_mixture_and_training_figures_come_from_the_runs(card, runs):
    for sources in (runs["pre_sources"], runs["sft_sources"]):
        total = sum(s["tokens"] for s in sources)
        for s in sources:
            assert (f"| {s['name']} | {s['weight']} | {100 * s['tokens'] / total:.1f}% | {s['tokens']:,} | "
                    f"{s['documents']:,} | {s['bytes']:,} | {s['license']} |") in card
    assert "`train` split: 91,234 tokens, 401,777 bytes of text, 2 shard(s)." in card
    assert "rows of 256 tokens" in card  # the SFT manifest's seq_len
    run, base = runs["run"], runs["base_run"]
    assert card.index("### Pre-training (base model)") < card.index("### Supervised fine-tuning (SFT)")
    for r in (run, base):
        assert f"| Optimizer steps (run) | {r['steps']:,} |" in card
        assert f"| Training tokens (run) | {r['tokens']:,} |" in card
    assert "| Hardware | 2x Fake CPU cores (world size 1) |" in card
    assert "| Wall time | 1h 02m 05s |" in card  # 3725.4 s
    last, last_val = runs["train"][-1], runs["val"][-1]
    assert f"| Final train loss | {last['loss']:.4f} (step {last['step']}) |" in card
    assert f"| Throughput | {last['tok_per_s']:,.0f} tokens/s |" in card
    assert f"| Validation loss | {last_val['val_loss']:.4f} (step {last_val['step']}) |" in card  # SFT
    base_val = runs["base_val"][-1]
    assert (f"| Validation loss / bits per byte | {base_val['val_loss']:.4f} / {base_val['val_bpb']:.4f} "
            f"(step {base_val['step']}) |") in card
    assert "`lr=0.0003`, `batch_size=8`, `seq_len=256`, `schedule=cosine`" in card


def test_an_older_checkpoint_reports_its_own_step(runs):
    text = render_model_card(runs["root"] / "sft" / "checkpoints" / "step_000015")
    at = next(d for d in runs["train"] if d["step"] == 15)
    assert f"| This checkpoint | step 15, {at['tokens']:,} tokens |" in text
    assert f"| Final train loss | {at['loss']:.4f} (step 15) |" in text
    assert "has not been evaluated" in text  # its folder has no eval_results.json


def test_evaluation_table_and_chance_baselines(card, runs):
    for task, t in runs["eval"]["tasks"].items():
        if t["chance"] is None:  # lambada: no acc_norm and no chance baseline, shown as dashes
            assert f"| {task} | {t['split']} | {t['n']:,} | {100 * t['acc']:.1f} ± {100 * t['acc_stderr']:.1f} | — | — |" in card
            continue
        assert (f"| {task} | {t['split']} | {t['n']:,} | {100 * t['acc']:.1f} ± {100 * t['acc_stderr']:.1f} | "
                f"{100 * t['acc_norm']:.1f} ± {100 * t['acc_norm_stderr']:.1f} | {100 * t['chance']:.1f} |") in card
    assert "loss 3.8765 nats/token, 1.4321 bits per byte over 4,321 tokens" in card
    near = [ln for ln in card.splitlines() if "Near-chance" in ln]
    assert len(near) == 1 and "arc_easy" in near[0] and "piqa" not in near[0]  # |0.2631-0.25| <= 2 * 0.0184


def test_quickstart_uses_the_folders_chat_ids(card, tiny_tokenizer):
    assert (f"<|im_start|> = {tiny_tokenizer.im_start_id} and <|im_end|> = {tiny_tokenizer.im_end_id}") in card
    assert "rep_penalty=1.15" in card and "temperature=0.2" in card


def _sources_numbers(runs, facts):
    """Every number the card may show: the sources' own values plus what the card derives from them."""
    texts = [json.dumps(runs["run"]), json.dumps(runs["base_run"]), json.dumps(runs["eval"]),
             json.dumps(facts["config"]), json.dumps(facts["tokenizer"]), json.dumps(RECOMMENDED)]
    metrics = runs["train"] + runs["val"] + runs["base_train"] + runs["base_val"]
    texts += [json.dumps(d) for d in metrics]
    allowed = {m for t in texts for m in NUM.findall(t)}
    c = facts["config"]
    derived = [facts["n_params"], facts["head_dim"], c["n_heads"] // c["n_kv_heads"], facts["year"],
               facts["kv_bytes_per_token_bf16"], facts["tokenizer"]["base_vocab_size"], 2]
    allowed |= {f"{x:,}" for x in derived} | {str(x) for x in derived} | {f"{facts['n_params'] / 1e6:.1f}"}
    allowed |= {f"{c['rope_theta']:,g}", "0.0", "1.0", "1"}  # 0.0 = greedy, 1.0 = off (sampling semantics)
    for r in (runs["run"], runs["base_run"]):
        m = r["data_manifest"]
        allowed |= {f"{x:,}" for s in m["sources"] for x in (s["tokens"], s["documents"], s["bytes"])}
        allowed |= {f"{x:,}" for sp in m["splits"].values() for x in (sp["tokens"], sp["bytes"])}
        allowed |= {str(len(sp["shards"])) for sp in m["splits"].values()}
        total = sum(s["tokens"] for s in m["sources"])
        allowed |= {f"{100 * s['tokens'] / total:.1f}" for s in m["sources"]}
    for d in runs["train"] + runs["base_train"]:
        allowed |= {f"{d['loss']:.4f}", f"{d['tok_per_s']:,.0f}", f"{100 * d['mfu']:.1f}", f"{d['tokens']:,}"}
    for d in runs["val"] + runs["base_val"]:
        allowed |= {f"{d['val_loss']:.4f}"} | ({f"{d['val_bpb']:.4f}"} if d["val_bpb"] is not None else set())
    for t in runs["eval"]["tasks"].values():
        allowed |= {f"{100 * t[k]:.1f}" for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "chance")
                    if t[k] is not None}
        allowed.add(f"{t['n']:,}")
    p = runs["eval"]["perplexity"]
    allowed |= {f"{p['val_loss']:.4f}", f"{p['bpb']:.4f}", f"{p['tokens']:,}"}
    return allowed


def test_no_number_without_a_source(card, runs):
    facts = card_facts(runs["root"] / "sft")
    allowed = _sources_numbers(runs, facts)
    body = card.replace("1h 02m 05s", "")  # checked above against wall_time_s
    stray = sorted(set(NUM.findall(body)) - allowed)
    assert not stray, f"numbers in the card with no source: {stray}"


def test_export_writes_card_and_license_and_llama_card(runs, tmp_path):
    out = export(runs["root"] / "sft", tmp_path / "hf", name="Quark-Test-Instruct")
    text = (out / "README.md").read_text()
    assert text == render_model_card(runs["root"] / "sft", name="Quark-Test-Instruct", repo_id=None)
    assert (out / "LICENSE").read_text() == MIT_LICENSE.format(year=2026)
    llama = export(runs["root"] / "sft", tmp_path / "llama", fmt="llama")
    lt = (llama / "README.md").read_text()
    assert "trust_remote_code" not in lt and "LlamaForCausalLM" in lt and _front(lt)["tags"][1] == "llama"


def test_license_template_matches_the_repository_license():
    repo_license = Path(__file__).resolve().parent.parent / "LICENSE"
    if not repo_license.exists():
        pytest.skip("not running from a source checkout")
    year = re.search(r"Copyright \(c\) (\d{4})", repo_license.read_text()).group(1)
    assert MIT_LICENSE.format(year=year) == repo_license.read_text()


def test_card_without_run_or_eval_says_so(tmp_path, tiny_tokenizer):
    save_model(Quark(PRESETS["test"]).init_weights(seed=0), tmp_path / "m")
    tiny_tokenizer.save(tmp_path / "m")
    text = render_model_card(tmp_path / "m")
    assert "no `run.json` found" in text and "has not been evaluated" in text
    assert "base_model" not in _front(text)


def test_bad_sources_name_file_and_line(runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["root"] / "sft", run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    n = len((run / "metrics.jsonl").read_text().splitlines())
    with pytest.raises(ValueError, match=rf"metrics.jsonl:{n}: not valid JSON"):
        render_model_card(run)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        render_model_card(runs["root"] / "sft", eval_results=tmp_path / "nope.json")


def test_parameter_count_guard(runs):
    model = Quark(PRESETS["test"].replace(d_ff=96))
    with pytest.raises(RuntimeError, match="disagree on the parameter count"):
        card_facts(runs["root"] / "sft", model=model)
    assert torch.is_tensor(next(model.parameters()))
