"""Checkpoints that do not stall training, on a local Ray (CPU): the upload is asynchronous.

`save_checkpoint` returns while the storage write is still held, a training step runs meanwhile, and the
checkpoint is committed once the write goes through (its local copy deleted then); a later checkpoint whose
upload fails fails the run with the storage's error. The storage is a local folder behind a gate (a
filesystem that holds the first checkpoint's writes until the training function opens the gate, and
refuses the second's): deterministic, no timing. One Ray Train run for both guarantees.
(FSDP's sharded checkpoints: tests/test_train_ray.py.)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pyarrow.fs
import pytest
import torch

from train.config import TrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import committed_checkpoints  # noqa: E402

# ---- asynchronous upload ----


class GatedStorage(pyarrow.fs.FileSystemHandler):
    """Local storage that holds the first checkpoint's file writes until `gate` exists and refuses the
    second checkpoint's."""

    def __init__(self, gate: str):
        self.gate = gate

    @property
    def fs(self):
        return pyarrow.fs.LocalFileSystem()

    def open_output_stream(self, path, metadata):
        if "/step_0000002" in path:
            raise OSError("storage refused the write (test)")
        if "/step_0000001" in path:
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
    """A checkpoint through the real save_checkpoint, a training step while its upload is held, then a
    second checkpoint, whose upload the storage refuses."""
    import tempfile

    from cluster.core import load_tokenizer
    from train.collate import collate_seq2seq
    from train.loop import RunState, report_checkpoint, save_checkpoint
    from train.model import build_model

    tempfile.tempdir = config["tmp"]  # where save_checkpoint's local folder goes: checked after the run
    tok = load_tokenizer("char")
    torch.manual_seed(0)
    model = build_model("t5-tiny", len(tok))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = TrainConfig(model="t5-tiny", num_workers=1, global_batch_size=2)
    cpu, metrics = torch.device("cpu"), Path(config["tmp"]) / "m.jsonl"
    pending = save_checkpoint(model, opt, tok, cfg, RunState(step=1), {"seed": 0}, 0, cpu, metrics, {})
    report_checkpoint(pending, 0, cpu, metrics, wait=True)
    uploaded = (Path(config["run_dir"]) / "step_0000001" / "checkpoint.json").exists()
    batch = collate_seq2seq({"input_ids": [[5, 6, 1], [7, 1]], "labels": [[8, 1], [9, 1]]})
    model(**batch).loss.backward()
    opt.step()
    Path(config["gate"]).touch()  # let the storage write go through
    local = lambda: [p for p in Path(config["tmp"]).iterdir() if p.name.startswith("mathtune-ckpt-")]  # noqa: E731
    deadline = time.monotonic() + 60
    while local() and time.monotonic() < deadline:  # Ray deletes the local copy once it is uploaded
        time.sleep(0.05)
    (Path(config["obs"])).write_text(json.dumps({"uploaded_when_save_returned": uploaded, "stepped": True,
                                                 "local_copy_deleted": not local()}))
    report_checkpoint(save_checkpoint(model, opt, tok, cfg, RunState(step=2), {"seed": 0}, 0, cpu, metrics, {}),
                      0, cpu, metrics, wait=True)


def fit_gated(tmp_path: Path) -> tuple[Exception | None, dict]:
    import ray.cloudpickle
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    (tmp_path / "tmp").mkdir()
    storage = tmp_path / "storage"
    storage.mkdir()
    config = {"tmp": str(tmp_path / "tmp"), "gate": str(tmp_path / "gate"), "obs": str(tmp_path / "obs.json"),
              "run_dir": str(storage / "gated")}
    fs = pyarrow.fs.PyFileSystem(GatedStorage(config["gate"]))
    trainer = TorchTrainer(gated_loop, train_loop_config=config, scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(name="gated", storage_path=str(storage), storage_filesystem=fs,
                                                failure_config=FailureConfig(max_failures=0)))
    try:
        result = trainer.fit()
    except Exception as e:  # Train V2 raises a failed run's error from fit()
        return e, config
    return result.error, config


@pytest.mark.slow
def test_upload_runs_in_the_background_and_a_failed_one_fails_the_run(ray_local, tmp_path):
    from train.checkpoint import verify_checkpoint

    error, config = fit_gated(tmp_path)
    obs = json.loads(Path(config["obs"]).read_text())
    # save_checkpoint returned while the storage still held the write, and a step ran meanwhile; once the
    # write went through, Ray deleted the local copy
    assert obs == {"uploaded_when_save_returned": False, "stepped": True, "local_copy_deleted": True}
    assert committed_checkpoints(Path(config["run_dir"])) == ["step_0000001"]  # committed whole ...
    assert verify_checkpoint(Path(config["run_dir"]) / "step_0000001")["step"] == 1
    # ... and the second checkpoint's failed upload failed the run (max_failures=0) with the storage's error
    assert error is not None and "storage refused the write" in str(error), error
