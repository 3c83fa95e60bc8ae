"""Per-row scores and their aggregation: sums and counts per block in Ray Data, combined in the driver.

Like nanochat's distributed eval (count locally, all-reduce the counts): every block emits one row of
partial sums per (regime, error class) group; the driver adds a few hundred such rows. No shuffle, and the
result does not depend on how rows were split across blocks or actors (sums of integers, and of F1 values
added in a fixed order by the driver).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from eval.metrics import ERROR_CLASSES, f1_from_counts, score

REGIME_ORDER = ("train-easy", "train-medium", "train-hard", "interpolate", "extrapolate")
SUM_FIELDS = ("n", "em", "tf_em", "f1_sum", "f1_common", "f1_n_pred", "f1_n_ref", "truncated")


def score_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add em, f1, error_class and the F1 token counts to a batch with `prediction` and `answer`."""
    scores = [score(p, r) for p, r in zip(batch["prediction"], batch["answer"], strict=True)]
    out = dict(batch)
    out["em"] = np.array([s.em for s in scores], dtype=bool)
    out["f1"] = np.array([s.f1 for s in scores], dtype=np.float64)
    out["error_class"] = np.array([s.error_class for s in scores], dtype=object)
    out["f1_common"] = np.array([s.common for s in scores], dtype=np.int64)
    out["f1_n_pred"] = np.array([s.n_pred for s in scores], dtype=np.int64)
    out["f1_n_ref"] = np.array([s.n_ref for s in scores], dtype=np.int64)
    return out


def block_partials(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One row of sums per (regime, error_class) present in this block."""
    n = len(batch["em"])
    regime = batch["regime"] if "regime" in batch else np.full(n, "unknown", dtype=object)
    tf_em = batch["tf_em"] if "tf_em" in batch else np.zeros(n, dtype=bool)
    truncated = batch["truncated"] if "truncated" in batch else np.zeros(n, dtype=bool)
    groups: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: dict.fromkeys(SUM_FIELDS, 0))
    for i in range(n):
        g = groups[(str(regime[i]), str(batch["error_class"][i]))]
        g["n"] += 1
        g["em"] += int(batch["em"][i])
        g["tf_em"] += int(tf_em[i])
        g["f1_sum"] += float(batch["f1"][i])
        g["f1_common"] += int(batch["f1_common"][i])
        g["f1_n_pred"] += int(batch["f1_n_pred"][i])
        g["f1_n_ref"] += int(batch["f1_n_ref"][i])
        g["truncated"] += int(truncated[i])
    keys = sorted(groups)
    out: dict[str, np.ndarray] = {
        "regime": np.array([k[0] for k in keys], dtype=object),
        "error_class": np.array([k[1] for k in keys], dtype=object),
    }
    for f in SUM_FIELDS:
        out[f] = np.array([groups[k][f] for k in keys], dtype=np.float64 if f == "f1_sum" else np.int64)
    return out


def _summarize(s: dict[str, float], teacher_forced: bool) -> dict[str, Any]:
    n = int(s["n"])
    d: dict[str, Any] = {
        "n": n,
        "exact_match": s["em"] / n if n else 0.0,
        "f1": s["f1_sum"] / n if n else 0.0,
        "f1_micro": f1_from_counts(int(s["f1_common"]), int(s["f1_n_pred"]), int(s["f1_n_ref"])) if n else 0.0,
        "truncated": int(s["truncated"]),
    }
    d["teacher_forced_exact_match"] = (s["tf_em"] / n if n else 0.0) if teacher_forced else None
    return d


def _regime_order(regimes) -> list[str]:
    """DeepMind's order (easy, medium, hard, interpolate), then any other regime alphabetically."""
    return sorted(regimes, key=lambda r: (REGIME_ORDER.index(r) if r in REGIME_ORDER else len(REGIME_ORDER), r))


def combine(partials: list[dict[str, Any]], teacher_forced: bool) -> dict[str, Any]:
    """Partial rows -> overall metrics, by regime and by error class (overall and per regime).

    Rows are sorted first so the float sum of F1 is added in the same order whatever the block layout.
    """
    partials = sorted(partials, key=lambda r: (r["regime"], r["error_class"], r["n"], r["f1_sum"]))
    total = dict.fromkeys(SUM_FIELDS, 0)
    by_regime: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(SUM_FIELDS, 0))
    errors: dict[str, int] = dict.fromkeys(ERROR_CLASSES, 0)
    errors_by_regime: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(ERROR_CLASSES, 0))
    for r in partials:
        for f in SUM_FIELDS:
            total[f] += r[f]
            by_regime[r["regime"]][f] += r[f]
        errors[r["error_class"]] = errors.get(r["error_class"], 0) + int(r["n"])
        errors_by_regime[r["regime"]][r["error_class"]] += int(r["n"])
    return {
        **_summarize(total, teacher_forced),
        "by_regime": {k: _summarize(by_regime[k], teacher_forced) for k in _regime_order(by_regime)},
        "error_classes": errors,
        "error_classes_by_regime": {k: dict(errors_by_regime[k]) for k in _regime_order(errors_by_regime)},
    }
