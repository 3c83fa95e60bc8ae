"""Security guarantees that a test can read off the code: no remote code, no pickle weight loads."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = [p for d in ("pipeline", "train", "eval", "cluster", "bench") for p in (ROOT / d).rglob("*.py")]


def test_code_is_scanned():
    assert len(CODE) >= 5, CODE  # the scan below would pass vacuously on an empty list


def test_no_code_path_enables_trust_remote_code():
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in CODE
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"trust_remote_code\s*=\s*(?!False\b)", line)
    ]
    assert not offenders, f"trust_remote_code must never be enabled: {offenders}"


def test_torch_load_always_weights_only():
    offenders = []
    for p in CODE:
        text = p.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                offenders.append(f"{p.relative_to(ROOT)}: {m.group(0)}")
    assert not offenders, f"torch.load must pass weights_only=True: {offenders}"


def test_no_pickle_weights_saved():
    # save_pretrained defaults to safetensors; nobody may switch that off.
    offenders = [str(p.relative_to(ROOT)) for p in CODE if "safe_serialization=False" in p.read_text()]
    assert not offenders, offenders
