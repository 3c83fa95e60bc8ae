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


def _call_args(text: str, start: int) -> str:
    """The argument text of the call whose '(' is at text[start], up to its balanced ')'."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1 : i]
    return text[start + 1 :]


def test_call_args_balances_parentheses():
    text = 'torch.load(Path(d) / "x.pt", map_location="cpu", weights_only=True)'
    assert _call_args(text, text.index("(")).endswith("weights_only=True")


def test_torch_load_always_weights_only():
    offenders = []
    for p in CODE:
        text = p.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            args = _call_args(text, m.end() - 1)
            if "weights_only=True" not in args:
                offenders.append(f"{p.relative_to(ROOT)}: torch.load({args})")
    assert not offenders, f"torch.load must pass weights_only=True: {offenders}"


def test_no_pickle_weights_saved():
    # save_pretrained defaults to safetensors; nobody may switch that off.
    offenders = [str(p.relative_to(ROOT)) for p in CODE if "safe_serialization=False" in p.read_text()]
    assert not offenders, offenders
