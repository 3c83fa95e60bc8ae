"""The trained model's Hugging Face model card (`<train output>/final/README.md`) and its upload.

The card is written with huggingface_hub's ModelCard / ModelCardData, so its YAML metadata is what the
hub reads: base model, datasets, the training config (under `mathtune:`), and a `model-index` with exact
match and F1 on the test split before and after training when the end-to-end job measured them.
`python -m train` writes it without metrics; `cluster.run` rewrites it after the final eval.

Pushing reads the token from $HF_TOKEN only (never a flag or config key, never logged or saved), and
refuses before any work when it is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.core import ModelError, is_local_spec, push_folder, read_json

HUB_DATASET = "deepmind/math_dataset"  # where the DeepMind Mathematics data lives on the hub

def _base_model(spec: str) -> str | None:
    """A hub id the card can link to; None for a from-scratch tiny model or a local folder."""
    from train.model import TINY_CONFIGS

    return None if spec in TINY_CONFIGS or is_local_spec(spec) else spec


def _results(before: dict | None, after: dict | None, dataset_name: str, split: str) -> list:
    from huggingface_hub import EvalResult

    out = []
    for when, m in (("after training", after), ("before training", before)):
        for key, name in (("exact_match", "Exact match"), ("f1", "F1")):
            if m and m.get(key) is not None:
                out.append(EvalResult(
                    task_type="text2text-generation", task_name="Math word problems (answer generation)",
                    dataset_type=HUB_DATASET, dataset_name=dataset_name, dataset_split=split,
                    metric_type=key, metric_value=round(float(m[key]), 6), metric_name=f"{name} ({when})",
                    metric_config="after" if when == "after training" else "before",
                ))
    return out


def _pct(m: dict | None, key: str) -> str:
    return "-" if not m or m.get(key) is None else f"{100 * m[key]:.2f}%"


def build_card(model_dir: str | Path, train_cfg: dict[str, Any], train_summary: dict | None = None,
               manifest: dict | None = None, eval_before: dict | None = None, eval_after: dict | None = None,
               name: str | None = None):
    """The ModelCard for a model folder, from the run's own records (config, summaries, metrics)."""
    from huggingface_hub import ModelCard, ModelCardData

    manifest = manifest or {}
    summary = train_summary or {}
    pipe_cfg = manifest.get("config") or {}
    module = pipe_cfg.get("module", "algebra__linear_1d")
    source = pipe_cfg.get("source", "unknown")
    split = (eval_after or eval_before or {}).get("split") or "test"
    base = _base_model(str(train_cfg.get("model", "")))
    rows = {k: manifest.get(k) for k in ("rows_in", "rows_kept", "rows_rejected") if k in manifest}
    data = ModelCardData(
        language="en",
        library_name="transformers",
        pipeline_tag="text2text-generation",
        tags=["t5", "math", "mathtune", "ray"],
        base_model=base,
        datasets=[HUB_DATASET],
        model_name=name or Path(model_dir).resolve().parent.name or "mathtune-model",
        eval_results=_results(eval_before, eval_after, f"DeepMind Mathematics {module}", split) or None,
        mathtune={
            "modules": [module],
            "source": source,
            "rows": rows or None,
            "tokenizer": (manifest.get("tokenizer") or {}).get("spec"),
            "training": {k: v for k, v in train_cfg.items() if k not in ("data", "output", "storage_path")},
            "steps": summary.get("steps"),
            "samples": summary.get("samples"),
            "best_step": (summary.get("best") or {}).get("step"),
            "metrics": {"before": {k: (eval_before or {}).get(k) for k in ("exact_match", "f1")} if eval_before
                        else None,
                        "after": {k: (eval_after or {}).get(k) for k in ("exact_match", "f1")} if eval_after
                        else None},
        },
    )
    origin = f"finetuned from [{base}](https://huggingface.co/{base})" if base else (
        f"trained from scratch ({train_cfg.get('model')})" if not is_local_spec(str(train_cfg.get("model", "")))
        else f"finetuned from the local checkpoint `{train_cfg.get('model')}`")
    metrics_table = (
        "| | exact match | F1 |\n|---|---|---|\n"
        f"| before training | {_pct(eval_before, 'exact_match')} | {_pct(eval_before, 'f1')} |\n"
        f"| after training | {_pct(eval_after, 'exact_match')} | {_pct(eval_after, 'f1')} |\n"
        if eval_before or eval_after else "Not evaluated yet: `python -m eval --model <this folder> ...`.\n")
    body = f"""
# {data.model_name}

A T5 sequence-to-sequence model {origin} on the DeepMind Mathematics dataset (module `{module}`, source
`{source}`) with mathtune (Ray Data pipeline, Ray Train, Ray Data evaluation).
It reads a question and generates the answer as text.

## Use

```python
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("<this folder or repo>")
model = AutoModelForSeq2SeqLM.from_pretrained("<this folder or repo>")
ids = tok("Solve 3*x = 9 for x.", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=32)[0], skip_special_tokens=True))
```

## Training

{summary.get('steps', '?')} optimizer steps, {summary.get('samples', '?')} sequences, global batch
{train_cfg.get('global_batch_size')}, peak learning rate {train_cfg.get('lr')}, precision
{train_cfg.get('precision')}; the checkpoint with the best validation exact match (step
{(summary.get('best') or {}).get('step', '?')}) is this model. Rows: {rows or 'see the pipeline manifest'}.
The full training config is in this card's metadata under `mathtune.training`.

## Evaluation ({split} split, greedy decoding)

{metrics_table}
## Limitations

Trained on one module of synthetic school-level mathematics; answers outside that distribution are
not to be trusted. Exact match compares normalized answer strings.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_card(model_dir: str | Path, train_cfg: dict[str, Any], eval_before: dict | None = None,
               eval_after: dict | None = None, name: str | None = None) -> Path:
    """Write <model_dir>/README.md from the records next to it (../summary.json, the data manifest)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"no model to describe in {model_dir} (config.json missing)")
    summary = read_json(model_dir.parent / "summary.json")
    manifest = read_json(Path(str(train_cfg.get("data", ""))) / "manifest.json")
    card = build_card(model_dir, train_cfg, summary, manifest, eval_before, eval_after, name)
    path = model_dir / "README.md"
    from cluster.core import write_text_atomic

    write_text_atomic(path, str(card))
    return path


def push_model(model_dir: str | Path, repo: str) -> str:
    """Upload the model folder (weights, tokenizer, card) to a private hub model repo (callers ran check_push
    before any work); the commit URL."""
    return push_folder(model_dir, repo, "model", "mathtune: model, tokenizer and card")
