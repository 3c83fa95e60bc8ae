"""Training pieces without Ray: collation, LR schedule, config validation, decoding, checkpoints, model
loading errors, the memory planner, and the overfit proof (the loop's own parts, in one process)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.config import ConfigError, from_dict
from train.checkpoint import (
    CheckpointError,
    export_model_dir,
    load_train_state,
    verify_checkpoint,
    write_checkpoint,
)
from train.collate import IGNORE_INDEX, collate_seq2seq
from train.config import TrainConfig
from train.loop import lr_at, truncate_metrics
from train.model import ModelError, build_model, check_model_dir, check_same_arch, tiny_config

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import linear_rows, make_dataset  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    from cluster.core import load_tokenizer

    return load_tokenizer("char")


# ---- collation ----
def test_collate_pads_to_multiple_and_masks_labels():
    batch = {"input_ids": np.array([np.array([5, 6, 1]), np.array([7, 8, 9, 10, 11, 12, 13, 14, 15, 1])],
                                   dtype=object),
             "labels": np.array([np.array([20, 1]), np.array([21, 22, 23, 1])], dtype=object)}
    out = collate_seq2seq(batch, pad_id=0, pad_to_multiple_of=8)
    assert out["input_ids"].shape == (2, 16) and out["labels"].shape == (2, 4)  # labels: longest answer only
    assert out["input_ids"][0].tolist() == [5, 6, 1] + [0] * 13
    assert out["attention_mask"][0].tolist() == [1, 1, 1] + [0] * 13
    assert out["attention_mask"][1].sum() == 10
    assert out["labels"][0].tolist() == [20, 1] + [IGNORE_INDEX] * 2
    assert out["input_ids"].dtype == torch.int64 and "decoder_input_ids" not in out


def test_collate_mask_from_lengths_not_pad_value():
    out = collate_seq2seq({"input_ids": [[0, 4, 1]], "labels": [[1]]}, pad_id=0, pad_to_multiple_of=1)
    assert out["attention_mask"].tolist() == [[1, 1, 1]]
    assert out["labels"].tolist() == [[1]]


def test_pad_2d_of_flat_rows_reads_only_each_rows_slice():
    """FlatRows (the in-memory path): rows anywhere in the flat array, in any order, the array's last row too."""
    from cluster.core import FlatRows, pad_2d

    values = np.array([9, 5, 6, 1, 9, 7, 1, 0, 3, 1], dtype=np.int32)
    ids, mask = pad_2d(FlatRows(values, np.array([7, 1, 5]), np.array([3, 3, 2])), -1, 4)
    assert ids.tolist() == [[0, 3, 1, -1], [5, 6, 1, -1], [7, 1, -1, -1]] and ids.dtype == np.int64
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0]]


def test_collate_rejects_empty_rows():
    with pytest.raises(ValueError, match="empty token list"):
        collate_seq2seq({"input_ids": [[]], "labels": [[1]]})


def test_padding_never_counts_in_the_loss(tok):
    """Same rows, different padding: identical loss (labels -100, mask from lengths, model's own shift)."""
    torch.manual_seed(0)
    model = build_model("t5-tiny", len(tok)).eval()
    rows = {"input_ids": [tok("Solve 2*x = 4 for x.")["input_ids"]], "labels": [tok("2")["input_ids"]]}
    a = collate_seq2seq(rows, pad_to_multiple_of=1)
    b = collate_seq2seq(rows, pad_to_multiple_of=64)
    # label padding, as a longer answer elsewhere in the batch adds it
    b["labels"] = torch.nn.functional.pad(b["labels"], (0, 6), value=IGNORE_INDEX)
    with torch.no_grad():
        assert torch.allclose(model(**a).loss, model(**b).loss, atol=1e-5)
    # the decoder input is the labels shifted right behind decoder_start (pad) with -100 -> pad
    shifted = model._shift_right(b["labels"])
    assert shifted[0, 0] == 0 and shifted[0, 1:3].tolist() == b["labels"][0, :2].tolist()
    assert (shifted >= 0).all()


# ---- schedule ----
def test_lr_warmup_then_linear_decay():
    cfg = TrainConfig(data="d", lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)


def test_divergence_is_the_latest_attempts_and_survives_a_torn_line(tmp_path):
    """The driver's reading of metrics.jsonl after fit(): a `diverged` entry counts only if no later
    attempt started; a line torn by a killed worker does not stop the driver from reading the rest."""
    from train.loop import divergence

    path = tmp_path / "metrics.jsonl"
    assert divergence(path) is None  # no file yet
    nan = {"event": "diverged", "step": 20, "first_step": 11, "loss": float("nan"), "grad_norm": 1.0}
    lines = [{"event": "start", "step": 0}, {"step": 10, "loss": 2.0}, nan]
    path.write_text("".join(json.dumps(m) + "\n" for m in lines) + '{"step": 21, "lo')  # torn
    assert divergence(path)["first_step"] == 11
    with open(path, "a") as f:
        f.write("\n" + json.dumps({"event": "start", "step": 10}) + "\n")  # resumed since: that NaN is old
    assert divergence(path) is None


def test_time_budget_end_at_the_runs_mean_step_time():
    """train.max_time_s: the end step is where the budget runs out at the run's mean step time (rank 0's),
    each start's first step left out, so one slow interval does not move it and a compiling first step does
    not shorten it; capped by max_steps, never before the current step; no estimate before a step is timed."""
    from train.loop import Interval, RunState, time_budget_end

    cfg = TrainConfig(data="d", global_batch_size=8, num_workers=1, micro_batch_size=4, max_time_s=60.0)
    cpu = torch.device("cpu")
    iv = Interval(micro=20, train_time=2.5)  # the last 10 steps (2 micro batches each) at 0.25 s per step
    state = dict(step=101, first_steps=1, first_steps_s=0.25)  # then 100 steps at 0.25 s: 25.25 s in all
    assert time_budget_end(iv, RunState(**state, train_time_s=25.25), cfg, 10_000, cpu, 0) == 101 + 139
    slow = Interval(micro=20, train_time=10.0)  # 1 s per step in the last interval: the mean (0.325 s) decides
    assert time_budget_end(slow, RunState(**state, train_time_s=32.75), cfg, 10_000, cpu, 0) == 101 + 83
    compiled = RunState(step=11, first_steps=1, first_steps_s=30.0, train_time_s=32.5)  # a 30 s first step
    assert time_budget_end(iv, compiled, cfg, 10_000, cpu, 0) == 11 + 110  # 27.5 s left at 0.25 s, not 2.95 s
    assert time_budget_end(iv, RunState(**state, train_time_s=25.25), cfg, 200, cpu, 0) == 200
    assert time_budget_end(iv, RunState(**state, train_time_s=59.9), cfg, 10_000, cpu, 0) == 101  # spent
    assert time_budget_end(iv, RunState(**state, train_time_s=75.0), cfg, 10_000, cpu, 0) == 101  # overspent
    only_first = RunState(step=1, first_steps=1, first_steps_s=5.0, train_time_s=5.0)
    assert time_budget_end(Interval(micro=2, train_time=5.0), only_first, cfg, 10_000, cpu, 0) == 1 + 11
    assert time_budget_end(Interval(micro=1), RunState(step=3, end_step=40), cfg, 10_000, cpu, 0) == 40
    # a validation step (eval_every 50) with less than a log interval (log_every 10) of budget left ends
    # there, rather than validating and checkpointing again a few steps later; other steps run it out
    cfg = dataclasses.replace(cfg, eval_every=50, log_every=10)
    at = lambda step, t: RunState(step=step, first_steps=1, first_steps_s=0.0, train_time_s=t)  # noqa: E731
    assert time_budget_end(iv, at(150, 59.0), cfg, 10_000, cpu, 0) == 150  # 1 s left at ~0.4 s per step
    assert time_budget_end(iv, at(140, 59.0), cfg, 10_000, cpu, 0) == 142
    assert time_budget_end(iv, at(150, 45.0), cfg, 10_000, cpu, 0) == 150 + 49  # 15 s at 0.302 s
    with pytest.raises(ConfigError, match="max_time_s"):
        TrainConfig(data="d", max_time_s=0)


def test_batch_derivation():
    cfg = TrainConfig(data="d", global_batch_size=128, num_workers=2, micro_batch_size=16)
    assert (cfg.per_worker_batch, cfg.micro_batch, cfg.grad_accum) == (64, 16, 4)
    assert TrainConfig(data="d", global_batch_size=128, num_workers=4).grad_accum == 1


def test_adamw_gets_the_configured_betas():
    from train.loop import make_optimizer
    from train.model import build_model

    model = build_model("t5-tiny", 64)
    cpu = torch.device("cpu")
    opt = make_optimizer(model, TrainConfig(data="d", adam_beta2=0.95), cpu, None)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert make_optimizer(model, TrainConfig(data="d"), cpu, None).param_groups[0]["betas"] == (0.9, 0.999)


def test_adafactor_steps_relative_to_each_tensor_under_the_loops_lr():
    """train.optimizer adafactor: transformers' Adafactor with steps scaled by each tensor's RMS
    (scale_parameter) and the LR the loop sets each step (relative_step off: an LR of 0 moves nothing)."""
    from transformers.optimization import Adafactor

    from train.loop import make_optimizer
    from train.model import build_model

    torch.manual_seed(0)
    model = build_model("t5-tiny", 64)
    opt = make_optimizer(model, TrainConfig(data="d", optimizer="adafactor", lr=1e-2), torch.device("cpu"), None)
    g = opt.param_groups[0]
    assert isinstance(opt, Adafactor) and g["scale_parameter"] and not g["relative_step"] and g["lr"] == 1e-2
    b = collate_seq2seq({"input_ids": [[5, 6, 1], [7, 1]], "labels": [[8, 1], [9, 1]]})
    before = [p.detach().clone() for p in model.parameters()]
    for lr in (0.0, 1e-2):
        g["lr"] = lr
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
        moved = [not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True)]
        assert any(moved) is (lr > 0)
    # relative: q (init std 0.016) and the embedding (std 1) moved by about the same share of their RMS
    q, emb = model.encoder.block[0].layer[0].SelfAttention.q.weight, model.shared.weight
    q0, emb0 = before[[p is q for p in model.parameters()].index(True)], before[0]
    rel = [((p - p0).pow(2).mean() / p0.pow(2).mean()).sqrt().item() for p, p0 in ((q, q0), (emb, emb0))]
    assert 0.2 < rel[0] / rel[1] < 5, rel


# ---- config validation ----
@pytest.mark.parametrize("values, message", [
    ({"global_batch_size": 10, "num_workers": 4}, "must be divisible by num_workers"),
    ({"micro_batch_size": 48}, "must divide the per-worker batch"),
    ({"ckpt_every": 150, "eval_every": 100}, "multiple of eval_every"),
    ({"max_steps": None}, "exactly one of max_steps and epochs"),
    ({"epochs": 1.0}, "exactly one of max_steps and epochs"),
    ({"warmup_steps": 600, "max_steps": 600}, "must be < max_steps"),
    ({"strategy": "fsdp", "num_workers": 1, "global_batch_size": 8}, "needs num_workers >= 2"),
    ({"precision": "fp16"}, "not one of"),
    ({"lr": 0}, "lr must be > 0"),
    ({"adam_beta2": 1.0}, "adam_beta1 and adam_beta2 must be in"),
    ({"optimizer": "adafactor", "strategy": "fsdp", "num_workers": 2}, "adafactor does not shard"),
    ({"optimizer": "sgd"}, "not one of"),
    ({"run_name": "a/b"}, "run_name"),
    ({"learning_rate": 1e-3}, "unknown key"),
])
def test_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(TrainConfig, values, "train")


def test_shipped_configs_parse():
    from cluster.config import resolve

    for f in ("configs/demo.yaml", "configs/flan-t5-large.yaml"):
        if Path(f).exists():
            cfg, _ = resolve(TrainConfig, "train", f, {})
            assert cfg.max_failures >= 1


# ---- decoding ----
def test_greedy_decode_matches_generate(tok):
    from train.decode import greedy_decode

    torch.manual_seed(1)
    model = build_model("t5-tiny", len(tok)).eval()
    b = collate_seq2seq({"input_ids": [tok("Solve 3*x = 9 for x.")["input_ids"], tok("1+1")["input_ids"]],
                         "labels": [[1], [1]]})
    ours = greedy_decode(model, b["input_ids"], b["attention_mask"], 6)
    ref = model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=6,
                         do_sample=False, num_beams=1)[:, 1:]  # generate prepends decoder_start
    n = min(ours.shape[1], ref.shape[1])
    assert ours[:, :n].tolist() == ref[:, :n].tolist()
    fixed = greedy_decode(model, b["input_ids"], b["attention_mask"], 6, fixed_steps=True)
    assert fixed.shape[1] == 6 and fixed[:, :n].tolist() == ours[:, :n].tolist()


def test_greedy_decode_speaks_both_names_of_the_kv_cache(tok):
    """transformers 5.17 (the GPU image) calls the KV cache `past_key_values`, 5.24 `cache`: the same
    decode must run on both (it died on `out.cache` on the GPU machine)."""
    from types import SimpleNamespace

    from train.decode import cache_kwarg, greedy_decode

    torch.manual_seed(1)
    model = build_model("t5-tiny", len(tok)).eval()
    new = cache_kwarg(model)

    class OldApi(torch.nn.Module):  # the model as an older transformers names its cache
        def __init__(self):
            super().__init__()
            self.m, self.config = model, model.config

        def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, encoder_outputs=None,
                    past_key_values=None, use_cache=None):
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                         encoder_outputs=encoder_outputs, use_cache=use_cache, **{new: past_key_values})
            return SimpleNamespace(logits=out.logits, encoder_last_hidden_state=out.encoder_last_hidden_state,
                                   past_key_values=getattr(out, new))

    old = OldApi()
    assert cache_kwarg(old) == "past_key_values"
    b = collate_seq2seq({"input_ids": [tok("Solve 3*x = 9 for x.")["input_ids"]], "labels": [[1]]})
    assert (greedy_decode(old, b["input_ids"], b["attention_mask"], 5, fixed_steps=True).tolist()
            == greedy_decode(model, b["input_ids"], b["attention_mask"], 5, fixed_steps=True).tolist())


# ---- checkpoints & model directories ----
def _ckpt(tmp_path, tok, name="t5-tiny", step=3):
    model = build_model(name, len(tok))
    d = tmp_path / f"ckpt-{name}-{step}"
    write_checkpoint(d, model, model.state_dict(), tok, {"step": step, "optimizer": {}, "epoch": 0})
    return model, d


def test_checkpoint_roundtrip_and_export(tmp_path, tok):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model, d = _ckpt(tmp_path, tok)
    assert verify_checkpoint(d)["step"] == 3 and load_train_state(d)["step"] == 3
    final = export_model_dir(d, tmp_path / "final")
    loaded = AutoModelForSeq2SeqLM.from_pretrained(final, use_safetensors=True)
    assert AutoTokenizer.from_pretrained(final).decode([40, 41]) == tok.decode([40, 41])
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    assert loaded.lm_head.weight is not loaded.shared.weight and loaded.encoder.embed_tokens.weight is loaded.shared.weight
    assert not (final / "train_state.pt").exists()


def test_tiny_model_has_flan_t5s_untied_head(tmp_path, tok):
    """transformers 5 ties T5 built from a config; ours untie the head as flan-t5 has it, and start sane."""
    from train.plan import architecture, count_params

    torch.manual_seed(0)
    m = build_model("t5-tiny", len(tok))
    assert m.lm_head.weight is not m.shared.weight and m.decoder.embed_tokens.weight is m.shared.weight
    assert not m.config.scale_decoder_outputs  # T5 v1.1 / flan: no d_model**-0.5 output scaling
    assert sum(p.numel() for p in m.parameters()) == count_params(architecture("t5-tiny"))[0]
    assert abs(m.lm_head.weight.std().item() - 128**-0.5) < 0.01
    b = collate_seq2seq({"input_ids": [[5, 6, 1], [7, 1]], "labels": [[8, 9, 1], [10, 1]]})
    assert m(**b).loss.item() < 6.0  # ~ln(98) = 4.6 at init; transformers' N(0, 1) head init gives ~21
    m.save_pretrained(tmp_path)  # its config.json says tie_word_embeddings=true (transformers 5 forces it)
    assert count_params(architecture(str(tmp_path)))[0] == count_params(architecture("t5-tiny"))[0]


def test_saved_config_says_untied_head_as_flan_t5s_does(tmp_path, tok):
    """Every model folder we write says tie_word_embeddings=false for an untied head (a reader honouring the
    flag, transformers 4 included, would otherwise tie the head and scale the output), and transformers 5
    loads it as the same model; an original (tied) T5's config is left as it is."""
    import json

    from transformers import AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration

    from train.model import save_model

    torch.manual_seed(0)
    m = build_model("t5-tiny", len(tok)).eval()
    save_model(m, tmp_path / "untied")
    cfg = json.loads((tmp_path / "untied" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["scale_decoder_outputs"] is False
    again = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "untied", use_safetensors=True).eval()
    assert not again.config.scale_decoder_outputs and again.lm_head.weight is not again.shared.weight
    b = collate_seq2seq({"input_ids": [[5, 6, 1], [7, 1]], "labels": [[8, 9, 1], [10, 1]]})
    with torch.no_grad():
        assert torch.equal(again(**b).logits, m(**b).logits)
    tied = T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_heads=2,
                                               num_layers=1))
    save_model(tied, tmp_path / "tied")
    cfg = json.loads((tmp_path / "tied" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["scale_decoder_outputs"] is True


def test_checkpoint_without_the_untied_head_is_refused(tmp_path, tok):
    from safetensors.torch import load_file, save_file

    from train.checkpoint import load_weights

    _, d = _ckpt(tmp_path, tok)
    fresh = build_model("t5-tiny", len(tok))
    load_weights(fresh, d)  # complete: loads (the tied embed_tokens copies are not in the file)
    weights = load_file(str(d / "model.safetensors"))
    assert "lm_head.weight" in weights and "encoder.embed_tokens.weight" not in weights
    del weights["lm_head.weight"]
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing \['lm_head.weight'\]"):
        load_weights(fresh, d)


def test_torn_checkpoint_is_refused(tmp_path, tok):
    _, d = _ckpt(tmp_path, tok)
    with open(d / "model.safetensors", "r+b") as f:  # a copy cut short
        f.truncate(100)
    with pytest.raises(CheckpointError, match="model.safetensors has 100 bytes"):
        verify_checkpoint(d)
    (d / "checkpoint.json").unlink()  # the manifest is written last: without it, never complete
    with pytest.raises(CheckpointError, match="checkpoint.json is missing"):
        load_train_state(d)


def test_checkpoint_from_another_model_is_refused(tmp_path, tok):
    from train.checkpoint import read_config

    _, d = _ckpt(tmp_path, tok, "t5-mini")
    with pytest.raises(ModelError, match="written by another model: d_model=256 \\(this run: 128\\)"):
        check_same_arch(tiny_config("t5-tiny", len(tok)), read_config(d), where=str(d))
    from transformers import T5Config

    from train.model import TINY_CONFIGS

    tied = T5Config(vocab_size=len(tok), feed_forward_proj="gated-gelu", **TINY_CONFIGS["t5-tiny"])  # original T5
    with pytest.raises(ModelError, match="scale_decoder_outputs=True \\(this run: False\\)"):
        check_same_arch(tiny_config("t5-tiny", len(tok)), tied.to_dict(), where="tied")


def test_model_dir_with_missing_files(tmp_path, tok):
    _, d = _ckpt(tmp_path, tok)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelError, match="missing model.safetensors.*only safetensors"):
        build_model(str(d), len(tok))
    (d / "config.json").unlink()
    with pytest.raises(ModelError, match="missing config.json"):
        check_model_dir(d)
    with pytest.raises(ModelError, match="does not exist"):
        build_model(str(tmp_path / "nope"), len(tok))


def test_local_model_dir_loads_and_vocab_checked(tmp_path, tok):
    _, d = _ckpt(tmp_path, tok)
    assert build_model(str(d), len(tok)).config.d_model == 128
    with pytest.raises(ModelError, match="embeds only 98"):
        build_model(str(d), 500)


def test_truncate_metrics_on_resume(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 2}\n{"step": 4}\n{"step": 6}\n{"step": 7, "lo')
    truncate_metrics(p, 4)
    assert p.read_text() == '{"step": 2}\n{"step": 4}\n'


# ---- memory planner ----
@pytest.mark.parametrize("name", ["t5-tiny", "t5-mini", "google/flan-t5-large"])
def test_plan_counts_parameters_exactly(name):
    from transformers import T5Config, T5ForConditionalGeneration

    from train.model import untie_lm_head
    from train.plan import architecture, count_params

    a = architecture(name)
    with torch.device("meta"):  # no memory, no weights
        model = untie_lm_head(T5ForConditionalGeneration(T5Config(**a)))  # as flan-t5 loads, and ours build
    assert count_params(a)[0] == sum(p.numel() for p in model.parameters())


def test_plan_static_memory_matches_real_tensors(tok):
    """weights + grads + AdamW state of the estimate == the bytes of the real tensors after one step."""
    from train.plan import estimate

    cfg = TrainConfig(data="d", model="t5-tiny", precision="fp32", num_workers=1, global_batch_size=2)
    plan = estimate(cfg)
    model = build_model("t5-tiny", len(tok))
    opt = torch.optim.AdamW(model.parameters())
    b = collate_seq2seq({"input_ids": [[5, 1], [6, 7, 1]], "labels": [[8, 1], [1]]})
    model(**b).loss.backward()
    opt.step()
    params = list(model.parameters())
    real = sum(p.numel() * p.element_size() for p in params) * 2  # weights + grads
    real += sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    est = plan.parts["weights"] + plan.parts["gradients"] + plan.parts["optimizer (AdamW 2 moments)"]
    assert est == real


def test_plan_fsdp_shards_and_flan_large_verdicts():
    from train.plan import estimate, format_plan

    base = TrainConfig(data="d", model="google/flan-t5-large", num_workers=4, global_batch_size=64,
                       micro_batch_size=8)
    ddp, fsdp = estimate(base), estimate(dataclasses.replace(base, strategy="fsdp"))
    assert fsdp.parts["optimizer (AdamW 2 moments)"] * 4 == ddp.parts["optimizer (AdamW 2 moments)"]
    assert fsdp.total < ddp.total
    assert ddp.fits()["A100 40GB"] and ddp.fits()["A100 80GB"]
    assert "fits A100 40GB    yes  micro batch    16  (p4d.24xlarge, a2-highgpu-8g)" in format_plan(ddp)
    xl = estimate(dataclasses.replace(base, model="google/flan-t5-xl"))
    assert not xl.fits()["A100 40GB"] and "fits A100 40GB    NO   micro batch  none  (p4d.24xlarge" in format_plan(xl)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_resume_state_roundtrip_continues_identically(tmp_path, tok, optimizer):
    """Model + optimizer state through a checkpoint (`make_optimizer` loads it): the next step is
    bit-identical to never stopping; a resume with the other optimizer is refused, naming both."""
    from train.checkpoint import load_model_state
    from train.loop import full_state_dicts, make_optimizer

    cfg, cpu = TrainConfig(data="d", optimizer=optimizer, lr=1e-3), torch.device("cpu")
    torch.manual_seed(0)
    m = build_model("t5-tiny", len(tok))
    opt = make_optimizer(m, cfg, cpu, None)
    b = collate_seq2seq({"input_ids": [[5, 1], [6, 7, 1]], "labels": [[8, 1], [1]]})
    m(**b).loss.backward()
    opt.step()
    opt.zero_grad()
    msd, osd = full_state_dicts(m, opt)
    write_checkpoint(tmp_path / "c", m, msd, tok, {"step": 1, "optimizer": osd, "optimizer_name": optimizer})
    m2 = build_model("t5-tiny", len(tok))
    m2.load_state_dict(load_model_state(tmp_path / "c"), strict=False)
    saved = {**load_train_state(tmp_path / "c"), "checkpoint": str(tmp_path / "c")}
    opt2 = make_optimizer(m2, cfg, cpu, saved)
    other = "adamw" if optimizer == "adafactor" else "adafactor"
    with pytest.raises(CheckpointError, match=f"holds {optimizer}'s state, this run's train.optimizer is {other}"):
        make_optimizer(m2, dataclasses.replace(cfg, optimizer=other), cpu, saved)
    for model, o in ((m, opt), (m2, opt2)):
        model(**b).loss.backward()
        o.step()
    assert all(torch.equal(x, y) for x, y in zip(m.parameters(), m2.parameters(), strict=True))


def test_plan_cli_prints_the_estimate(capsys):
    from train.__main__ import main

    assert main(["plan", "--config", "configs/flan-t5-large.yaml", "--strategy", "fsdp"]) == 0
    out = capsys.readouterr().out
    assert "783.2M parameters" in out and "fsdp on 8 worker(s)" in out and "fits H100 80GB    yes" in out


def test_train_data_with_missing_mistyped_or_corrupt_columns_is_refused_before_ray(tmp_path):
    """The driver checks the splits' schema from the Parquet footers (no Ray Data job) and names the problem."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from train.trainer import DataError, open_split

    (tmp_path / "train").mkdir()
    pq.write_table(pa.table({"input_ids": [[5, 1]], "label": [[6, 1]]}), tmp_path / "train" / "a.parquet")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['labels'\]; it has \['input_ids', 'label'\]"):
        open_split(str(tmp_path), "train", ["input_ids", "labels"])
    pq.write_table(pa.table({"input_ids": ["5 1"], "labels": [[6, 1]]}), tmp_path / "train" / "a.parquet")
    with pytest.raises(DataError, match="column input_ids must be a list of token ids, got string"):
        open_split(str(tmp_path), "train", ["input_ids", "labels"])
    (tmp_path / "train" / "a.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="cannot read its Parquet files"):
        open_split(str(tmp_path), "train", ["input_ids", "labels"])
    pq.write_table(pa.table({"input_ids": [[5, 1]] * 3, "labels": [[6, 1]] * 3}), tmp_path / "train" / "a.parquet")
    assert open_split(str(tmp_path), "train", ["input_ids", "labels"]).count_rows() == 3


@pytest.fixture
def gloo_group(tmp_path):
    """A one-process gloo group, as a Ray Train worker has (DDP needs one)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_compiled_training_runs_every_block_compiled_at_every_length_and_matches_eager(tok, gloo_group):
    """train.compile under DDP (the default strategy) and bucketing's many padded lengths, with more
    decoder blocks than dynamo's 8 variants per function: the blocks compile in the first step (dynamic
    shapes), then every block of every step runs its compiled graph, whatever the (question, answer)
    lengths; the parameters after the steps are eager's; validation runs eager and compiles nothing.
    (Static shapes, or a training forward filling T5's KV cache, used up the 8 variants within a few
    lengths or decoder blocks, after which the rest ran eager; dynamo's DDP optimizer failed on the
    dynamic shapes at the first step: compile_blocks.)"""
    from torch.nn.parallel import DistributedDataParallel
    from transformers import T5Config, T5ForConditionalGeneration

    from train.loop import Interval, compile_blocks, train_step, validate

    made = {"graphs": 0, "calls": 0}

    def counting(gm, _):  # dynamo's graph, run as captured (autograd differentiates it), counted when made
        made["graphs"] += 1  # and each time it runs. (AOT autograd + inductor: the inductor test below,
                             # 3-5 min here, and the GPU check's compiled bench.)
        def run(*args):
            made["calls"] += 1
            return gm.forward(*args)
        return run

    arch = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_heads=2, num_layers=2,
                    num_decoder_layers=10, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                    tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                    decoder_start_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    eager = T5ForConditionalGeneration(arch)
    compiled = T5ForConditionalGeneration(arch)
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled, backend=counting)
    # Dynamo's DDP optimizer fails on dynamic-shape graphs once AOT autograd traces them (aot_eager and
    # inductor: the inductor test below runs under DDP); this backend does not trace, so it is checked off.
    assert torch._dynamo.config.optimize_ddp is False
    ddp = DistributedDataParallel(compiled)  # as ray.train.torch.prepare_model wraps it in a worker
    n_blocks = 2 + 10

    cfg = TrainConfig(data="d", model="t5-tiny", precision="fp32", num_workers=1, global_batch_size=2, lr=1e-2)
    qs = [("Solve 2*x = 4 for x.", "2"), ("Solve 31*y - 5 = 88 + 2*y for y.", "-31"),
          ("Solve -1231*k + 1227*k + 24 = 4 - 3*k + 3812 for k.", "-3792"), ("Let 3 = h. Solve h = 3.", "3"),
          ("Solve 0 = 5*b + 10 for b.", "-2")]
    rows = [{"input_ids": [tok(q)["input_ids"] for q, _ in pair], "labels": [tok(a)["input_ids"] for _, a in pair]}
            for pair in ((qs[0], qs[1]), (qs[2], qs[3]), (qs[0], qs[3]), (qs[4], qs[0]))]
    batches = [collate_seq2seq(r, tok.pad_token_id, 8) for r in rows]
    assert len({(b["input_ids"].shape[1], b["labels"].shape[1]) for b in batches}) == 4  # four distinct shapes
    cpu = torch.device("cpu")
    losses, graphs = {}, []
    for model in (eager, ddp):
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        it = iter(batches)
        for step in range(len(batches)):
            iv = Interval()
            train_step(model, opt, it, cfg, cpu, 1, iv)
            losses.setdefault(id(model), []).append(float(iv.loss))
            if model is ddp:
                graphs.append(made["graphs"])
                assert made["calls"] == n_blocks * (step + 1), f"step {step}: a block ran eager"
    assert graphs == [graphs[0]] * len(batches) and graphs[0] <= 4  # compiled in the first step, never again
    assert losses[id(ddp)] == pytest.approx(losses[id(eager)], rel=1e-4)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), name

    before = dict(made)
    val = validate(ddp, {"input_ids": [tok(q)["input_ids"] for q, _ in qs], "labels": [tok(a)["input_ids"] for _, a in qs],
                         "answer": [a for _, a in qs]}, tok, cfg, cpu, max_new_tokens=6)
    assert made == before and val["val_samples"] == 5 and ddp.training


@pytest.mark.skipif(not os.environ.get("MATHTUNE_TEST_INDUCTOR"),
                    reason="inductor's C++ code generation takes ~3-5 min on 2 cores; MATHTUNE_TEST_INDUCTOR=1 runs it")
def test_compiled_blocks_give_the_eager_loss_and_gradients_with_inductor(tok, gloo_group):
    """train.compile with the default backend, under DDP as in a Ray Train worker: inductor's kernels (CPU
    here) compute what eager does, at two padded lengths."""
    from torch.nn.parallel import DistributedDataParallel

    from train.loop import compile_blocks

    torch.manual_seed(0)
    eager = build_model("t5-tiny", len(tok))
    compiled = build_model("t5-tiny", len(tok))
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled)  # inductor
    ddp = DistributedDataParallel(compiled)
    for q, a in (("Solve 2*x = 4 for x.", "2"), ("Solve -1231*k + 1227*k + 24 = 4 - 3*k + 3812 for k.", "-3792")):
        b = collate_seq2seq({"input_ids": [tok(q)["input_ids"], tok("Solve 3*y = 9 for y.")["input_ids"]],
                             "labels": [tok(a)["input_ids"], tok("3")["input_ids"]]})
        losses = []
        for m in (eager, ddp):
            m.zero_grad()
            loss = m(**b, use_cache=False).loss
            loss.backward()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-4)
        g0, g1 = (m.encoder.block[0].layer[0].SelfAttention.q.weight.grad for m in (eager, compiled))
        assert torch.allclose(g0, g1, rtol=1e-3, atol=1e-6)


def test_loading_an_untied_t5_does_not_log_the_tie_notice(tmp_path, tok):
    """transformers 5 logs "... will NOT tie them" at every load of a T5 with its own head (flan-t5's too):
    train's and eval's loaders drop that line, and only that one."""
    import logging

    from transformers import AutoModelForSeq2SeqLM

    from cluster.console import UntiedHeadNotice
    from eval.resolve import load_model
    from train.model import save_model

    save_model(build_model("t5-tiny", len(tok)), tmp_path)
    logger = logging.getLogger("transformers.modeling_utils")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        load_model(str(tmp_path))
        build_model(str(tmp_path), len(tok))
        assert not [r for r in records if "NOT tie them" in r.getMessage()]
        for f in [f for f in logger.filters if isinstance(f, UntiedHeadNotice)]:
            logger.removeFilter(f)
        AutoModelForSeq2SeqLM.from_pretrained(tmp_path, use_safetensors=True)  # the notice is real
        assert [r for r in records if "to tie shared.weight to lm_head.weight" in r.getMessage()]
    finally:
        logger.removeHandler(handler)


def test_overfit_64_examples_to_exact_match(tmp_path):
    """Proves labels, masking, shift and decoding: with the parts each Ray Train worker runs (its data
    shard, train_step, lr_at, validate; here in one process, no Ray: the Ray path is
    tests/test_train_ray.py's), the tiny model memorizes 64 rows, scored by generation."""
    from cluster.core import load_tokenizer, open_split
    from train.data import VAL_COLUMNS, InMemoryShard, ShardIterator, validation_subset
    from train.loop import Interval, make_optimizer, train_step, validate

    rows = linear_rows(64, seed=7)
    data = make_dataset(tmp_path / "data", train_rows=rows, val_rows=rows, files=1)
    cfg = TrainConfig(data=str(data), output=str(tmp_path / "out"), model="t5-tiny", precision="fp32",
                      num_workers=1, global_batch_size=64, lr=3e-3, min_lr_ratio=0.05, warmup_steps=10,
                      max_steps=40, eval_every=10, ckpt_every=40, eval_samples=64, eval_batch_size=64,
                      max_new_tokens=6, shuffle_buffer=0)
    tokenizer = load_tokenizer(str(data / "tokenizer"))
    torch.manual_seed(cfg.seed)  # as setup_model
    model = build_model(cfg.model, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    cpu = torch.device("cpu")
    optimizer = make_optimizer(model, cfg, cpu, None)
    # One epoch = one step of exactly the 64 rows, in a new order each epoch.
    batches = ShardIterator(InMemoryShard(sorted(str(p) for p in (data / "train").glob("*.parquet")), 0, 1,
                                          cfg.micro_batch, cfg.seed, tokenizer.pad_token_id, cfg.pad_to_multiple_of))
    val = validation_subset(open_split(str(data), "validation", VAL_COLUMNS), 64, 1, cfg.seed)
    ems = []
    for step in range(cfg.max_steps):
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, cfg, cfg.max_steps)
        train_step(model, optimizer, batches, cfg, cpu, 1, Interval())
        if (step + 1) % cfg.eval_every == 0:
            ems.append(round(64 * validate(model, val, tokenizer, cfg, cpu, 6)["val_exact_match"]))
    # Measured: 19, 63, 64, 64 of 64 at steps 10-40, the same as this run through Ray Train measured (which
    # it replaces here: 11 s less). A bug in labels, masking, shift or decoding keeps exact match near 0.
    assert max(ems) == 64 and ems[-1] >= 63, ems


def test_steady_rate_leaves_out_each_starts_first_step():
    from train.trainer import steady_rate

    # two starts (a resume): 100 steps of 8 in 30 s, of which the two first steps took 20 s
    m = {"samples": 800, "train_time_s": 30.0, "first_steps": 2, "first_steps_s": 20.0}
    assert steady_rate(m, 8) == {"first_steps": 2, "first_steps_s": 20.0, "samples_per_s_after_first_step": 78.4}
    assert steady_rate({**m, "samples": 16}, 8)["samples_per_s_after_first_step"] is None  # only first steps
    assert steady_rate({"samples": 80, "train_time_s": 2.0}, 8)["first_steps"] == 0  # an older checkpoint's metrics


def test_log_line_eta_is_the_time_budget_left_before_its_end_step_is_estimated(tmp_path, caplog):
    """With train.max_time_s the first log line comes before any estimate of the budget's end step
    (max_steps is only a cap, e.g. 1,000,000): its eta is the budget left, not max_steps' hours."""
    import logging

    from train.loop import Interval, RunState, log_interval
    from train.tracking import NoTracker

    cfg = TrainConfig(data="d", global_batch_size=8, num_workers=1, max_time_s=100.0)
    iv = Interval(loss=torch.tensor(8.0), micro=4, tokens=400, samples=32, train_time=10.0)
    iv.t0 -= 10.0
    with caplog.at_level(logging.INFO, logger="mathtune.train"):
        log_interval(iv, RunState(step=4, samples=32), 0.01, 0, 1_000_000, cfg, torch.device("cpu"), 0,
                     tmp_path / "metrics.jsonl", NoTracker())
    assert "step 4/1000000 loss 2.0000" in caplog.text and "eta 00:01:30" in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mathtune.train"):  # without a budget: max_steps at this rate
        log_interval(iv, RunState(step=4, samples=32), 0.01, 0, 40, dataclasses.replace(cfg, max_time_s=None),
                     torch.device("cpu"), 0, tmp_path / "metrics.jsonl", NoTracker())
    assert "eta 00:01:30" in caplog.text, caplog.text
