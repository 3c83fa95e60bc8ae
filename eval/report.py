"""report.md: the metrics as Markdown tables, plus PNG plots (matplotlib, Agg backend, no display)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cluster.core import read_jsonl

log = logging.getLogger("mathtune.eval")

NORMALIZATION_NOTE = (
    "Answers are compared after normalization: surrounding whitespace and special tokens (`</s>`, `<pad>`) "
    "removed, and numbers compared by value, so numerically equal answers such as `-06`, `-6` and `-6.0` "
    "count as equal; booleans ignore case, lists are compared item by item, and polynomials ignore spacing "
    "and the order of their terms. F1 is the bag-of-characters overlap of the normalized answers (mean per example, "
    "and micro: from token counts summed over the corpus)."
)
TF_NOTE = (
    "Teacher-forced exact match = argmax of the logits given the gold answer prefix matches every gold "
    "token. It is the metric the seed project published (9.56% for flan-t5-large before finetuning, "
    "90.75% after) and is shown only for comparison: it never lets the model's own mistakes compound, so "
    "it overstates what generation achieves. The headline is generation exact match."
)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def read_train_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's entries with a step (torn lines skipped: read_jsonl)."""
    return [row for row in read_jsonl(path) if "step" in row]


def plot_accuracy_by_regime(metrics: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(metrics["by_regime"])
    em = [100 * metrics["by_regime"][r]["exact_match"] for r in regimes]
    f1 = [100 * metrics["by_regime"][r]["f1"] for r in regimes]
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(regimes) + 2), 3.5))
    x = range(len(regimes))
    ax.bar([i - 0.2 for i in x], em, width=0.4, label="exact match")
    ax.bar([i + 0.2 for i in x], f1, width=0.4, label="F1 (mean)")
    ax.set_xticks(list(x), regimes)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(f"Accuracy by regime (n={metrics['n']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def plot_accuracy_by_module(metrics: dict[str, Any], path: Path) -> None:
    """Horizontal bars per module, one per regime side by side (as in Saxton et al. 2019, figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eval.metrics import regime_order

    modules = sorted(metrics["by_module"], reverse=True)  # alphabetical from the top
    regimes = regime_order(r for m in modules for r in metrics["by_module"][m]["by_regime"])
    height = 0.8 / len(regimes)
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.25 * len(modules) * len(regimes) + 1.2)))
    for k, r in enumerate(regimes):
        em = [100 * metrics["by_module"][m]["by_regime"].get(r, {}).get("exact_match", 0.0) for m in modules]
        ax.barh([i + 0.4 - (k + 0.5) * height for i in range(len(modules))], em, height=height, label=r)
    ax.set_yticks(range(len(modules)), modules)
    ax.set_xlim(0, 100)
    ax.set_xlabel("exact match %")
    ax.set_title(f"Exact match by module (n={metrics['n']})")
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def warning_lines(metrics: dict[str, Any]) -> list[str]:
    """The console's (and report's) warnings when the model answers (nearly) the same thing every time
    (overall, and per module when there are several), or gets the sign of numeric answers wrong one way."""
    c = metrics.get("collapse") or {}
    out = []
    if c.get("collapsed"):
        top = ", ".join(f"{p['prediction']!r} {100 * p['share']:.1f}%" for p in c["top_predictions"][:3])
        out.append(f"WARNING: the model has collapsed: it answers {top} of {metrics['n']} rows "
                   f"({c['distinct_predictions']} distinct answers given, {c['distinct_answers']} in the gold; the "
                   f"most common gold answer is {100 * c['top_answer_share']:.1f}%). Exact match here measures "
                   "guessing, not solving.")
    sign = metrics.get("sign") or {}
    if sign.get("biased") and not c.get("collapsed"):
        em = ", ".join(f"{100 * sign[k]:.1f}% where the gold is {side}" for k, side in
                       (("exact_match_gold_negative", "negative"), ("exact_match_gold_positive", "positive"))
                       if sign.get(k) is not None)
        out.append(f"WARNING: sign bias: {100 * sign['predicted_negative']:.1f}% of the numeric answers given are "
                   f"negative, {100 * sign['gold_negative']:.1f}% of the gold's ({sign['rows']} rows; exact match "
                   f"{em}). The model has not learned when the answer is negative.")
    mods = c.get("collapsed_modules") or []
    if mods and len(metrics.get("by_module", {})) > 1:
        per = ", ".join(
            f"{m} ({metrics['by_module'][m]['top_prediction']['prediction']!r} for "
            f"{100 * metrics['by_module'][m]['top_prediction']['share']:.1f}% of its rows)" for m in mods)
        out.append(f"WARNING: collapsed in module(s) {per}.")
    return out


def warning_section(metrics: dict[str, Any]) -> list[str]:
    """A warning block for report.md (collapse, sign bias) with the top predictions, else nothing."""
    lines = warning_lines(metrics)
    if not lines:
        return []
    out = [x for line in lines for x in (f"> **{line}**", ">")][:-1]
    out += ["", "| top prediction | rows | share | share as gold answer |", "|---|---|---|---|"]
    out += [f"| `{p['prediction']}` | {p['rows']} | {_pct(p['share'])} | {_pct(p['gold_share'])} |"
            for p in metrics["collapse"]["top_predictions"]]
    return [*out, ""]


def plot_training_curve(rows: list[dict[str, Any]], path: Path) -> bool:
    """Loss (and validation loss / exact match where logged) against step. False if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    val_em = [(r["step"], r["val_exact_match"]) for r in rows if r.get("val_exact_match") is not None]
    if not train and not val:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    lines, labels = ax.get_legend_handles_labels()
    if val_em:
        ax2 = ax.twinx()
        ax2.plot(*zip(*[(s, 100 * v) for s, v in val_em], strict=True), "s--", color="tab:green",
                 label="validation exact match")
        ax2.set_ylabel("exact match %")
        l2, lab2 = ax2.get_legend_handles_labels()
        lines, labels = lines + l2, labels + lab2
    ax.legend(lines, labels, loc="upper right")
    ax.set_title("Training curve")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return True


def write_report(metrics: dict[str, Any], out: Path, train_dir: Path | None) -> Path:
    plot_accuracy_by_regime(metrics, out / "accuracy_by_regime.png")
    plot_accuracy_by_module(metrics, out / "accuracy_by_module.png")
    curve = False
    if train_dir and (train_dir / "metrics.jsonl").is_file():
        curve = plot_training_curve(read_train_metrics(train_dir / "metrics.jsonl"), out / "training_curve.png")
    tf = metrics.get("teacher_forced_exact_match")
    lines = [
        "# Evaluation report",
        "",
        *(
            [f"- predictions: `{metrics['predictions']}` (scored as given)"]
            if metrics.get("predictions")
            else [f"- model: `{metrics.get('model')}`",
                  f"- data: `{metrics.get('data')}` (split `{metrics.get('split')}`)"]
        ),
        f"- rows: {metrics['rows_in']} in, {metrics['rows_scored']} scored",
        "",
        *warning_section(metrics),
        "| metric | value |",
        "|---|---|",
        f"| **exact match (generation)** | **{_pct(metrics['exact_match'])}** |",
        f"| F1 (mean per example) | {_pct(metrics['f1'])} |",
        f"| F1 (micro, corpus) | {_pct(metrics['f1_micro'])} |",
        f"| teacher-forced exact match (seed's metric) | {_pct(tf)} |",
        f"| predictions cut at max_new_tokens | {metrics.get('truncated', 0)} |",
        "",
        NORMALIZATION_NOTE,
        "",
        TF_NOTE if tf is not None else "",
        "",
        "## By regime",
        "",
        "| regime | n | exact match | F1 (mean) | F1 (micro) | teacher-forced EM |",
        "|---|---|---|---|---|---|",
    ]
    for r, m in metrics["by_regime"].items():
        lines.append(
            f"| {r} | {m['n']} | {_pct(m['exact_match'])} | {_pct(m['f1'])} | {_pct(m['f1_micro'])} | "
            f"{_pct(m.get('teacher_forced_exact_match'))} |"
        )
    lines += ["", "![accuracy by regime](accuracy_by_regime.png)", "", "## By module and regime", "",
              "| module | regime | n | exact match | F1 (mean) | top prediction |", "|---|---|---|---|---|---|"]
    for mod, m in metrics["by_module"].items():
        top = m.get("top_prediction")
        top_s = f"`{top['prediction']}` {_pct(top['share'])}" if top else "-"
        lines.append(f"| **{mod}** | all | {m['n']} | **{_pct(m['exact_match'])}** | {_pct(m['f1'])} | {top_s}"
                     + (" (collapsed)" if m.get("collapsed") else "") + " |")
        for r, v in m["by_regime"].items():
            lines.append(f"| | {r} | {v['n']} | {_pct(v['exact_match'])} | {_pct(v['f1'])} | |")
    lines += ["", "![accuracy by module](accuracy_by_module.png)", "", "## Error classes", ""]
    classes = list(metrics["error_classes"])
    regimes = list(metrics["error_classes_by_regime"])
    lines.append("| class | all | " + " | ".join(regimes) + " |")
    lines.append("|---" * (2 + len(regimes)) + "|")
    for c in classes:
        per = [str(metrics["error_classes_by_regime"][r].get(c, 0)) for r in regimes]
        lines.append(f"| {c} | {metrics['error_classes'][c]} | " + " | ".join(per) + " |")
    lines += [
        "",
        "sign_error: the negated answer; off_by_small: |pred - gold| <= max(2, 10% of |gold|); "
        "wrong_magnitude: a different power of ten; other_numeric: any other wrong number; "
        "non_numeric: not a number (or empty).",
    ]
    if curve:
        lines += ["", "## Training curve", "", f"From `{train_dir / 'metrics.jsonl'}`.", "",
                  "![training curve](training_curve.png)"]
    if metrics.get("examples_per_s"):
        lines += ["", f"Throughput: {metrics['examples_per_s']:.1f} examples/s over {metrics['wall_s']:.1f} s "
                  f"({metrics.get('num_actors')} actor(s))."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
