"""Sharded (FSDP, torch.distributed.checkpoint) checkpoints without Ray: one gloo process, FSDP2 over a
world of 1 (the same code paths as 2 workers, which tests/test_train_ray.py runs)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

from cluster.core import CheckpointError, load_tokenizer
from train.checkpoint import (
    consolidate_model,
    export_model_dir,
    is_sharded,
    load_sharded_state,
    load_train_state,
    verify_checkpoint,
    write_sharded_checkpoint,
)
from train.collate import collate_seq2seq
from train.loop import shard
from train.model import build_model


@pytest.fixture
def pg(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("char")


BATCH = {"input_ids": [[5, 6, 1], [7, 1]], "labels": [[8, 1], [9, 10, 1]]}


def fsdp_model(tok, seed=0):
    torch.manual_seed(seed)
    m = build_model("t5-tiny", len(tok))
    shard(m)  # as training does
    return m, torch.optim.AdamW(m.parameters(), lr=1e-3)


def step(m, opt):
    m(**collate_seq2seq(BATCH)).loss.backward()
    opt.step()
    opt.zero_grad()


def full(m) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor() for k, v in m.state_dict().items()}


def test_sharded_checkpoint_resumes_identically_and_exports(pg, tok, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        m, opt = fsdp_model(tok)
        step(m, opt)
    # FSDP2's "returned a view tensor" (T5's position bias, only ever added out of place) is not shown
    assert not [w for w in seen if "view tensor" in str(w.message)], [str(w.message) for w in seen]
    d = write_sharded_checkpoint(tmp_path / "c", m, opt, tok, {"step": 1, "epoch": 0, "data_order": {"seed": 0}}, 0)
    manifest = verify_checkpoint(d)
    assert is_sharded(d) and manifest["untied_lm_head"] and manifest["data_order"] == {"seed": 0}
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "config.json", "train_state.pt"} <= set(manifest["files"])
    assert "optimizer" not in load_train_state(d) and not list(d.glob("*.safetensors"))

    # resume: a fresh (differently initialised) model + optimizer take the saved state; the next step
    # is bit-identical to never stopping
    m2, opt2 = fsdp_model(tok, seed=1)
    load_sharded_state(m2, opt2, d)
    step(m, opt)
    step(m2, opt2)
    a, b = full(m), full(m2)
    assert all(torch.equal(a[k], b[k]) for k in a)

    # the export: consolidated once, from_pretrained-loadable, the saved weights exactly, head untied
    from train.__main__ import main

    saved = consolidate_model(d).state_dict()
    final = tmp_path / "final"
    assert main(["export", str(d), str(final)]) == 0  # python -m train export: any kept checkpoint
    assert not (final / "dcp").exists() and not (final / "train_state.pt").exists()
    assert '"tie_word_embeddings": false' in (final / "config.json").read_text()  # as flan-t5's: untied head
    loaded = AutoModelForSeq2SeqLM.from_pretrained(final, use_safetensors=True)
    got = loaded.state_dict()
    assert set(got) == set(saved) and all(torch.equal(got[k], saved[k]) for k in saved)
    assert not torch.equal(got["lm_head.weight"], a["lm_head.weight"])  # a step later: not the live model
    assert loaded.lm_head.weight is not loaded.shared.weight


def test_torn_sharded_checkpoint_is_refused(pg, tok, tmp_path):
    m, opt = fsdp_model(tok)
    d = write_sharded_checkpoint(tmp_path / "c", m, opt, tok, {"step": 1}, 0)
    (d / "dcp" / "__0_0.distcp").unlink()  # one rank's shard never arrived
    with pytest.raises(CheckpointError, match="dcp/__0_0.distcp missing"):
        export_model_dir(d, tmp_path / "final")
    assert not (tmp_path / "final").exists()


def test_a_new_checkpoint_waits_for_the_previous_upload_boundedly(tmp_path):
    """Backpressure: Ray's single upload thread queues checkpoints as local copies; a new one is written only
    once the previous copy is gone (uploaded and deleted by Ray), and the wait is bounded."""
    import threading
    import time

    from train.loop import wait_for_uploads

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    pending = [str(a)]
    assert wait_for_uploads(pending, timeout_s=0.2) == pytest.approx(0.2, abs=0.15)  # never deleted: bounded
    assert pending == [str(a)]
    threading.Timer(0.3, a.rmdir).start()  # "uploaded": Ray deletes the local copy
    waited = wait_for_uploads(pending, timeout_s=30)
    assert 0.25 <= waited < 5 and pending == []
    pending = [str(b)]
    assert wait_for_uploads(pending, max_pending=2) < 0.05  # below the bound: no wait
    assert pending == [str(b)]
    t0 = time.perf_counter()
    b.rmdir()
    assert wait_for_uploads(pending) < 0.05 and pending == [] and time.perf_counter() - t0 < 1


def test_local_checkpoint_copies_of_dead_workers_are_removed_and_no_other(tmp_path):
    """A worker killed mid-upload leaves its local copy; the restarted worker removes exactly those."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from train.checkpoint import checkpoint_dir_prefix, local_checkpoint_dir, remove_orphaned_checkpoints

    live = Path(local_checkpoint_dir(str(tmp_path)))  # this process's: alive
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True, check=True).stdout)
    dead = tmp_path / (checkpoint_dir_prefix(socket.gethostname(), dead_pid) + "x1")
    (dead / "dcp").mkdir(parents=True)
    (dead / "dcp" / "__0_0.distcp").write_bytes(b"shard")
    other_host = tmp_path / (checkpoint_dir_prefix("another-pod", dead_pid) + "x2")  # its pid space is not ours
    other_host.mkdir()
    unrelated = tmp_path / "mathtune-ckpt-abc"
    unrelated.mkdir()
    assert remove_orphaned_checkpoints(str(tmp_path)) == [dead.name]
    assert not dead.exists() and live.is_dir() and other_host.is_dir() and unrelated.is_dir()
    assert remove_orphaned_checkpoints(str(tmp_path)) == []


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fsdp_bf16_mixed_training_step_checkpoint_and_resume(device, tok, tmp_path):
    """What an FSDP worker runs, in one process (gloo on CPU, NCCL on a GPU): `distribute` shards with the
    bf16 mixed-precision policy (fp32 master weights, bf16 in the forward), `make_optimizer` (fused AdamW on
    a GPU, over DTensors), the loop's `train_step` (autocast, two micro batches, the DTensor gradient norm);
    then a sharded checkpoint, and a differently initialised model resumed from it takes the same next
    step. On a GPU this is the only FSDP run the device check makes (one GPU: no multi-rank NCCL)."""
    import math

    from torch.distributed.tensor import DTensor

    from train.config import TrainConfig
    from train.loop import Interval, distribute, make_optimizer, train_step

    dev = torch.device(device, 0) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{tmp_path / 'pg'}",
                            rank=0, world_size=1)
    try:
        # num_workers 2 is what the config asks of FSDP; this process is the world (train_step's world=1)
        cfg = TrainConfig(data="d", model="t5-tiny", precision="bf16-mixed", strategy="fsdp", num_workers=2,
                          global_batch_size=4, micro_batch_size=1, lr=1e-3, use_gpu=device == "cuda")
        assert cfg.grad_accum == 2

        def fresh(seed):
            torch.manual_seed(seed)
            m = distribute(build_model("t5-tiny", len(tok)), cfg, dev)
            return m, make_optimizer(m, cfg, dev, None)

        m, opt = fresh(0)
        assert opt.defaults["fused"] is (device == "cuda")
        p = m.encoder.block[0].layer[0].SelfAttention.q.weight
        assert isinstance(p, DTensor) and p.dtype == torch.float32 and p.device.type == device  # master weights
        seen = []
        hook = m.encoder.block[0].layer[0].SelfAttention.q.register_forward_pre_hook(
            lambda mod, _: seen.append(mod.weight.dtype))
        batches = [collate_seq2seq({k: v[i:i + 1] for k, v in BATCH.items()}) for i in range(2)]

        def loop_step(model, optimizer):
            iv = Interval()
            train_step(model, optimizer, iter(batches), cfg, dev, 1, iv)
            return float(iv.loss), float(iv.grad_norm)

        loss, norm = loop_step(m, opt)
        hook.remove()
        assert seen == [torch.bfloat16] * 2, "the policy's bf16 weights in the forward of both micro batches"
        assert math.isfinite(loss) and 0 < norm < math.inf

        d = write_sharded_checkpoint(tmp_path / "c", m, opt, tok, {"step": 1}, 0)
        m2, opt2 = fresh(1)
        load_sharded_state(m2, opt2, d)
        (loss_a, norm_a), (loss_b, norm_b) = loop_step(m, opt), loop_step(m2, opt2)
        assert loss_b == pytest.approx(loss_a, rel=1e-6) and norm_b == pytest.approx(norm_a, rel=1e-5)
        a, b = full(m), full(m2)
        assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in a)
    finally:
        dist.destroy_process_group()


def test_a_replicated_checkpoint_is_written_in_the_background_from_a_snapshot(pg, tok, tmp_path, monkeypatch):
    """DDP / one worker: rank 0 writes the checkpoint on a thread. save_checkpoint returns while the write
    is held, the next training step changes the live weights and AdamW moments in place meanwhile, and the
    checkpoint still holds its own step's state (a snapshot: on CPU the state dict is the live tensors, so
    it is cloned). A failed write is raised in the training thread when the checkpoint is reported."""
    import tempfile
    import threading

    from torch.nn.parallel import DistributedDataParallel

    import train.checkpoint
    import train.loop
    from train.checkpoint import load_model_state
    from train.config import TrainConfig
    from train.loop import RunState, report_checkpoint, save_checkpoint

    gate, real = threading.Event(), train.checkpoint.write_checkpoint
    monkeypatch.setattr(train.checkpoint, "write_checkpoint", lambda *a, **k: gate.wait(30) and real(*a, **k))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the local checkpoint folder goes
    monkeypatch.setattr(train.loop, "_pending_uploads", [])  # no Ray here uploads (and deletes) them
    torch.manual_seed(0)
    model = DistributedDataParallel(build_model("t5-tiny", len(tok)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step(model, opt)
    weights = {k: v.clone() for k, v in model.module.state_dict().items()}
    moment = opt.state[model.module.lm_head.weight]["exp_avg"].clone()
    cfg, cpu = TrainConfig(model="t5-tiny", num_workers=1, global_batch_size=2), torch.device("cpu")

    pending = save_checkpoint(model, opt, tok, cfg, RunState(step=1), {"seed": 0}, 0, cpu, tmp_path / "m.jsonl", {})
    assert pending.writer.is_alive() and not pending.written() and pending.blocked_s < 5
    step(model, opt)  # training goes on while the write is held
    assert not torch.equal(model.module.lm_head.weight, weights["lm_head.weight"])
    gate.set()
    pending.writer.join(60)
    assert pending.written() and pending.error is None
    saved = load_model_state(pending.directory)
    assert all(torch.equal(saved[k], weights[k]) for k in saved), "the checkpoint holds its own step's weights"
    saved_moment = load_train_state(pending.directory)["optimizer"]["state"]["lm_head.weight"]["exp_avg"]
    assert torch.equal(saved_moment, moment)

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train.checkpoint, "write_checkpoint", full_disk)
    train.loop._pending_uploads.clear()  # "uploaded": Ray would have deleted the first one's local copy
    pending = save_checkpoint(model, opt, tok, cfg, RunState(step=2), {"seed": 0}, 0, cpu, tmp_path / "m.jsonl", {})
    with pytest.raises(CheckpointError, match=r"writing checkpoint step 2 to .* failed: \[Errno 28\] No space left"):
        report_checkpoint(pending, 0, cpu, tmp_path / "m.jsonl", wait=True)
