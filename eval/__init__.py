"""Evaluation stage: `python -m eval`, or `eval.run(cfg, ray_cfg)` from cluster.run.

`eval.metrics` is pure (no Ray, no torch) and safe to import from anywhere (train imports it); `run` is
imported lazily so that importing the metrics does not pull in Ray.
"""

from __future__ import annotations

from typing import Any


def run(cfg, ray_cfg=None) -> dict[str, Any]:
    from eval.job import run as _run

    return _run(cfg, ray_cfg)


__all__ = ["run"]
