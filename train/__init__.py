"""The training stage: `python -m train`, or `train.run(cfg, ray_cfg) -> summary dict` from cluster.run.

Imported lazily so that `import train` (e.g. for train.model in cluster.run) does not pull in Ray.
"""

from __future__ import annotations

from typing import Any


def run(cfg, ray_cfg=None) -> dict[str, Any]:
    from train.trainer import run as _run

    return _run(cfg, ray_cfg)


__all__ = ["run"]
