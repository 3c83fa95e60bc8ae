"""Checkpoints that do not stall training, on a local Ray (CPU, gloo):

- FSDP writes sharded checkpoints (one DCP file per rank, nothing gathered); a worker killed after the
  first committed checkpoint resumes from the shards onto the uninterrupted run's loss curve, and final/
  (consolidated once, at the end) loads with from_pretrained and holds the best checkpoint's weights.
- The upload is asynchronous: `save_checkpoint` returns while the storage write is still held, a training
  step runs meanwhile, and the checkpoint is committed once the write goes through. A failed upload fails
  the run with the storage's error. The storage is a local folder behind a gate (a filesystem that holds
  every checkpoint write until the training function opens the gate): deterministic, no timing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import pyarrow.fs
import pytest
import torch

from train.config import TrainConfig
from train.trainer import run

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import (  # noqa: E402
    assert_same_curve,
    committed_checkpoints,
    loss_curve,
    make_dataset,
    read_metrics,
    run_killing_rank0,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ckpt-data"), n_train=128, n_val=16)


def fsdp_cfg(data: Path, out: Path) -> TrainConfig:
    return TrainConfig(data=str(data), output=str(out), model="t5-tiny", precision="fp32", num_workers=2,
                       strategy="fsdp", global_batch_size=16, max_steps=8, warmup_steps=2, eval_every=4,
                       ckpt_every=4, eval_samples=16, eval_batch_size=8, max_new_tokens=4, log_every=1,
                       keep_best_k=1, max_failures=1, lr=3e-3)


@pytest.fixture(scope="module")
def fsdp_ref(ray_local, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp-ref")
    cfg = fsdp_cfg(data, out)
    return cfg, run(cfg), out


def assert_sharded_and_exported(cfg: TrainConfig, summary: dict, out: Path) -> None:
    from transformers import AutoModelForSeq2SeqLM

    from train.checkpoint import consolidate_model, verify_checkpoint

    kept = sorted((Path(cfg.resolved_storage_path()) / cfg.run_name).glob("step_*"))
    assert kept
    for d in kept:
        manifest = verify_checkpoint(d)
        assert manifest["layout"] == "sharded"
        # one shard per rank and DCP's metadata; no gathered safetensors, no full optimizer state
        assert {f for f in manifest["files"] if f.startswith("dcp/")} == {"dcp/.metadata", "dcp/__0_0.distcp",
                                                                       "dcp/__1_0.distcp"}
        assert not list(d.glob("*.safetensors"))
        assert "optimizer" not in torch.load(d / "train_state.pt", weights_only=True)
    ckpts = [m for m in read_metrics(out) if m.get("event") == "checkpoint"]
    assert ckpts and all(c["layout"] == "sharded" and c["blocked_s"] > 0 for c in ckpts)
    final = AutoModelForSeq2SeqLM.from_pretrained(out / "final", use_safetensors=True)
    best = consolidate_model(summary["best_checkpoint"]).state_dict()
    got = final.state_dict()
    assert set(best) == set(got) and all(torch.equal(best[k], got[k]) for k in best)
    assert final.lm_head.weight is not final.shared.weight  # flan-style untied head survives the export


@pytest.mark.slow
def test_fsdp_sharded_checkpoints_and_export(fsdp_ref):
    cfg, summary, out = fsdp_ref
    assert summary["steps"] == 8 and summary["strategy"] == "fsdp"
    assert_sharded_and_exported(cfg, summary, out)
    curve = loss_curve(out)
    assert sorted(curve) == list(range(1, 9)) and curve[8] < curve[1]


@pytest.mark.slow
def test_fsdp_worker_sigkill_resumes_from_shards_on_the_same_curve(fsdp_ref, data, tmp_path):
    ref_cfg, _, ref_out = fsdp_ref
    out = tmp_path / "killed"
    cfg = dataclasses.replace(ref_cfg, output=str(out))
    summary = run_killing_rank0(cfg, after_step=4)
    resumes = [m for m in read_metrics(out) if m.get("event") == "resume"]
    assert resumes and resumes[0]["step"] >= 4
    assert_sharded_and_exported(cfg, summary, out)
    assert_same_curve(ref_out, out, 8)


# ---- asynchronous upload ----


class GatedStorage(pyarrow.fs.FileSystemHandler):
    """Local storage that holds every checkpoint file write until `gate` exists (or raises, with fail)."""

    def __init__(self, gate: str, fail: bool = False):
        self.gate, self.fail = gate, fail

    @property
    def fs(self):
        return pyarrow.fs.LocalFileSystem()

    def open_output_stream(self, path, metadata):
        if "/step_" in path:
            if self.fail:
                raise OSError("storage refused the write (test)")
            deadline = time.monotonic() + 60  # a synchronous upload would wait here, then fail the test
            while not os.path.exists(self.gate) and time.monotonic() < deadline:
                time.sleep(0.05)
        return self.fs.open_output_stream(path, metadata=metadata)

    # the rest: the local filesystem as is
    def get_type_name(self):
        return "gated-local"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("not for tests")

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)


def gated_loop(config: dict) -> None:
    """One checkpoint through the real save_checkpoint, then a training step while its upload is held."""
    import tempfile

    from cluster.core import load_tokenizer
    from train.collate import collate_seq2seq
    from train.loop import RunState, save_checkpoint
    from train.model import build_model

    tempfile.tempdir = config["tmp"]  # where save_checkpoint's local folder goes: checked after the run
    tok = load_tokenizer("char")
    torch.manual_seed(0)
    model = build_model("t5-tiny", len(tok))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = TrainConfig(model="t5-tiny", num_workers=1, global_batch_size=2)
    save_checkpoint(model, opt, tok, cfg, RunState(step=1), {"seed": 0}, 0, Path(config["tmp"]) / "m.jsonl", {})
    uploaded = (Path(config["run_dir"]) / "step_0000001" / "checkpoint.json").exists()
    batch = collate_seq2seq({"input_ids": [[5, 6, 1], [7, 1]], "labels": [[8, 1], [9, 1]]})
    model(**batch).loss.backward()
    opt.step()
    (Path(config["obs"])).write_text(json.dumps({"uploaded_when_save_returned": uploaded, "stepped": True}))
    Path(config["gate"]).touch()  # let the storage write go through


def fit_gated(tmp_path: Path, fail: bool):
    import ray.cloudpickle
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    (tmp_path / "tmp").mkdir()
    storage = tmp_path / "storage"
    storage.mkdir()
    config = {"tmp": str(tmp_path / "tmp"), "gate": str(tmp_path / "gate"), "obs": str(tmp_path / "obs.json"),
              "run_dir": str(storage / "gated")}
    fs = pyarrow.fs.PyFileSystem(GatedStorage(config["gate"], fail))
    trainer = TorchTrainer(gated_loop, train_loop_config=config, scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(name="gated", storage_path=str(storage), storage_filesystem=fs,
                                                failure_config=FailureConfig(max_failures=0)))
    return trainer.fit(), config


@pytest.mark.slow
def test_upload_runs_in_the_background_while_training_goes_on(ray_local, tmp_path):
    from train.checkpoint import verify_checkpoint

    result, config = fit_gated(tmp_path, fail=False)
    obs = json.loads(Path(config["obs"]).read_text())
    # save_checkpoint returned while the storage still held the write, and a step ran meanwhile
    assert obs == {"uploaded_when_save_returned": False, "stepped": True}
    assert result.checkpoint is not None and result.checkpoint.path.endswith("step_0000001")
    assert verify_checkpoint(result.checkpoint.path)["step"] == 1  # committed whole once the gate opened
    assert committed_checkpoints(Path(config["run_dir"])) == ["step_0000001"]
    assert not [p for p in Path(config["tmp"]).iterdir() if p.name.startswith("mathtune-ckpt-")]  # deleted


@pytest.mark.slow
def test_failed_background_upload_fails_the_run(ray_local, tmp_path):
    with pytest.raises(Exception, match="storage refused the write"):
        result, _ = fit_gated(tmp_path, fail=True)
        if result.error is not None:
            raise result.error
