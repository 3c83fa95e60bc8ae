"""Training stage: `python -m train` / `train.run(cfg, ray_cfg) -> summary dict` (see train/trainer.py)."""

from train.config import TrainConfig
from train.trainer import run

__all__ = ["TrainConfig", "run"]
