"""Turns the device check's raw outputs into Markdown for bench/RESULTS.md (bench/gpu_check.sh calls it).

    python -m bench.gpu_report train  RESULTS.md runs.jsonl [--title ...]   # bench.train_gpu_bench lines
    python -m bench.gpu_report eval   RESULTS.md eval_bench.json            # bench.eval_bench --json
    python -m bench.gpu_report speedrun RESULTS.md DATA TRAIN_OUT EVAL_OUT  # manifest, summary, metrics

Every section it appends names the card, the date and the versions; a missing input file becomes a line
saying so (a step that timed out leaves none), never a crash that would lose the other numbers.
"""

from __future__ import annotations

import argparse
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

from cluster.core import read_json, read_jsonl


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def environment() -> str:
    """Card, driver-visible CUDA, Python and library versions, in one line."""
    parts = [f"python {platform.python_version()}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
        if torch.cuda.is_available():
            parts.insert(0, torch.cuda.get_device_name())
    except ImportError:
        pass
    for mod in ("transformers", "ray"):
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            parts.append(f"{mod} missing")
    return ", ".join(parts)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def train_section(rows: list[dict], title: str) -> str:
    out = [f"### {title}", "", f"{_now()}; {environment()}", ""]
    if not rows:
        return "\n".join(out + ["No result: the step failed, timed out or was left out (see the steps table and its log).", ""])
    out += ["| model | optimizer | compile | micro batch | shapes (question, answer) | step ms | samples/s | useful tok/s "
            "| MFU useful | MFU padded | max mem GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r.get('optimizer', 'adamw')} | {r.get('compile')} | {r['micro_batch']} | "
                       f"{r['error']} | | | | | | |")
            continue
        shapes = " ".join(f"{s}x{t}" for s, t in r["shapes"])
        out.append(f"| {r['model']} | {r.get('optimizer', 'adamw')} | {r['compile']} | {r['micro_batch']} | {shapes} | "
                   f"{r['step_ms']} | "
                   f"{r['samples_per_s']:,.0f} | {r['useful_tokens_per_s']:,} | {_pct(r['mfu_useful'])} | "
                   f"{_pct(r['mfu_padded'])} | {r['max_memory_gib']} |")
    dev = rows[0].get("device", "?")
    out += ["", f"Device {dev}, peak {rows[0].get('peak_tflops')} dense bf16 TFLOP/s (bench/flops.py); random "
            "weights, lengths: " + str(rows[0].get("lengths", "")), ""]
    prof = [r for r in rows if "gpu_busy" in r]  # --profile: where a step's time goes
    for r in prof:
        top = ", ".join(f"{k} {v} ms" for k, v in r["top_gpu_kernels_ms_per_step"][:4])
        cpu = ", ".join(f"{k} {v} ms" for k, v in r["top_cpu_ops_ms_per_step"][:4])
        out.append(f"- profile, {r.get('optimizer', 'adamw')}, compile {r['compile']}, micro batch {r['micro_batch']}: GPU busy {_pct(r['gpu_busy'])} "
                   f"of the step, {r['kernels_per_step']:,} kernels per step; top GPU: {top}; top CPU: {cpu}")
    return "\n".join(out + ([""] if prof else []))


def eval_section(path: Path) -> str:
    out = ["### 10k-row eval (bench.eval_bench --gpu)", "", f"{_now()}; {environment()}", ""]
    r = read_json(path)
    if r is None:  # missing or torn: say so, never crash (the other sections must still be written)
        return "\n".join(out + ["No result: the step failed, timed out or was left out (see the steps table and its log).", ""])
    out += [f"{r['model']}; {r['rows']} rows, batch {r['batch_size']}. Target: <= 20 s on one H100.", "",
            "| what | wall s | examples/s | Ray Data part s | before Ray s | Ray start s | actor ready s (imports, "
            "model load) |", "|---|---|---|---|---|---|---|"]
    for run in r["runs"]:
        ray_part = f"{run['ray_data_wall_s']:.1f}" if "ray_data_wall_s" in run else "-"
        t = run.get("timing_s") or {}
        before, start = (f"{t[k]:.1f}" if t.get(k) is not None else "-" for k in ("process_start_to_ray", "ray_start"))
        actors = "; ".join(f"{a['since_process_start']:.1f} ({a['imports']:.1f}, {a['model_load']:.1f})"
                           for a in run.get("actor_ready_s") or []) or "-"
        out.append(f"| {run['what']} | {run['wall_s']:.1f} | {run['examples_per_s']:,.0f} | {ray_part} | {before} | "
                   f"{start} | {actors} |")
    return "\n".join(out + [""])


def train_curve(metrics: list[dict], points: int = 10) -> list[str]:
    """The loss and validation curves in a line each (about `points` train points), and a divergence:
    what a plateau or a NaN looks like, without opening metrics.jsonl."""
    train = [m for m in metrics if "loss" in m and "event" not in m]
    val = [m for m in metrics if "val_exact_match" in m]
    out = []
    if train:
        every = max(1, len(train) // points)
        pick = train[every - 1::every]
        if pick[-1] is not train[-1]:
            pick.append(train[-1])  # always the last point
        out.append("- train loss (grad norm) by step: " + ", ".join(
            f"{m['step']}: {m['loss']:.3g} ({m.get('grad_norm', float('nan')):.2g})" for m in pick))
    if val:
        out.append("- validation exact match by step: " + ", ".join(
            f"{m['step']}: {_pct(m['val_exact_match'])}" for m in val))
    ckpts = [m for m in metrics if m.get("event") == "checkpoint" and "write_s" in m]
    if ckpts:
        out.append("- checkpoints (step: local write s / training blocked s): " + ", ".join(
            f"{m['step']}: {m['write_s']:.2f} / {m['blocked_s']:.2f}" for m in ckpts))
    for m in metrics:
        if m.get("event") == "diverged":
            out.append(f"- **train DIVERGED**: loss {m['loss']}, largest grad norm {m['grad_norm']} over steps "
                       f"{m['first_step']}-{m['step']} (lr {m['lr']:.2e}); stopped, last checkpoint step "
                       f"{m['last_checkpoint_step']}")
    return out


def steady(summary: dict) -> str:
    """The rate without the first step (its one-off costs), where summary.json has it."""
    rate = summary.get("samples_per_s_after_first_step")
    return f", {rate:,.0f} after the first step of {summary['first_steps_s']} s" if rate else ""


def loop_vs_bare_step(summary: dict, probe_rows: list[dict]) -> str | None:
    """The training loop's steady samples/s against the probe's bare step (same model, batch and optimizer):
    what the loop adds (data, logging, the step's host work) beyond forward, backward and the update."""
    rate = summary.get("samples_per_s_after_first_step") or summary.get("samples_per_s")
    bare = [r for r in probe_rows if "samples_per_s" in r and r.get("model") == summary.get("model")
            and r.get("micro_batch") == summary.get("global_batch_size")
            and r.get("optimizer", "adamw") == summary.get("optimizer", "adamw")]
    if not rate or not bare:
        return None
    b = bare[-1]
    return (f"- the loop ran at **{rate / b['samples_per_s']:.2f}x the probe's bare step** ({rate:,.0f} vs "
            f"{b['samples_per_s']:,.0f} samples/s, {b.get('optimizer', 'adamw')}, "
            f"batch {b['micro_batch']})")


def speedrun_section(data: Path, train_out: Path, eval_out: Path, probe: Path | None = None) -> str:
    out = ["### Speedrun (configs/speedrun.yaml)", "", f"{_now()}; {environment()}", ""]
    if (m := read_json(data / "manifest.json")) is not None:
        reasons = m.get("rows_rejected_by_reason") or ""
        out.append(f"- pipeline: {m.get('rows_in', 0):,} rows in, kept by split {m.get('rows_kept_by_split')}, "
                   f"rejected {m.get('rows_rejected', 0):,} {reasons}".rstrip()
                   + f"; {m.get('elapsed_s')} s ({m.get('rows_per_s')} rows/s) on {os.cpu_count()} cores")
    else:
        out.append("- pipeline: no manifest (failed or timed out)")
    if (t := read_json(train_out / "summary.json")) is not None:
        best = t.get("best") or {}
        budget = f"; ended by its time budget, {t['max_time_s']:g} s" if t.get("stopped_by_time") else ""
        opt = f" ({t['optimizer']}, lr {t['lr']:g})" if "optimizer" in t else ""
        out.append(f"- train: {t['model']}{opt}, {t['steps']} steps of {t['global_batch_size']}, {t['samples']:,} samples "
                   f"in {t['train_time_s']} s of training ({t['samples_per_s']:,.0f} samples/s{steady(t)}{budget}), "
                   f"{t['wall_time_s']} s wall; best validation exact match "
                   f"{_pct(best.get('val_exact_match'))} at step {best.get('step')}")
        if probe is not None and (ratio := loop_vs_bare_step(t, read_jsonl(probe))):
            out.append(ratio)
    else:
        out.append("- train: no summary.json (failed or timed out)")
    out += train_curve(read_jsonl(train_out / "metrics.jsonl"))
    if (m := read_json(eval_out / "metrics.json")) is not None:
        out.append(f"- eval: **exact match {_pct(m.get('exact_match'))}** on {m.get('rows_scored')} interpolate "
                   f"rows (target >= 95%), F1 {_pct(m.get('f1'))}, {m.get('wall_s', 0):.1f} s")
    else:
        out.append("- eval: no metrics.json (failed or timed out)")
    return "\n".join(out + [""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_report", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train")
    t.add_argument("results")
    t.add_argument("jsonl")
    t.add_argument("--title", default="flan-t5-large training (bench.train_gpu_bench)")
    e = sub.add_parser("eval")
    e.add_argument("results")
    e.add_argument("json")
    s = sub.add_parser("speedrun")
    s.add_argument("results")
    s.add_argument("data")
    s.add_argument("train_out")
    s.add_argument("eval_out")
    s.add_argument("--probe", default=None, help="the probe's train_gpu_bench JSON lines (its bare step rate)")
    a = p.parse_args(argv)
    if a.what == "train":
        text = train_section(read_jsonl(Path(a.jsonl)), a.title)
    elif a.what == "eval":
        text = eval_section(Path(a.json))
    else:
        text = speedrun_section(Path(a.data), Path(a.train_out), Path(a.eval_out), a.probe and Path(a.probe))
    with open(a.results, "a") as f:
        f.write("\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
