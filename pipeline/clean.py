"""Text cleaning, vectorized with Arrow compute (no Python call per row on the fast path).

Every hub copy of the DeepMind data wraps each string in Python's bytes repr plus the newline of the
original text file: "b'Solve 24 = 1601*c - 1605*c for c.\\n'". The seed sliced [2:-3], which silently
eats the first two and last three characters of any string that is *not* wrapped; here the wrapper is
removed only where it is present. Whitespace runs become one space and the ends are trimmed.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# b'...' or b"..." (repr picks double quotes when the text contains a single quote), with the literal
# two-character "\n" the release files' newline became inside the repr. RE2 syntax (Arrow compute).
_WRAPPED_SINGLE = r"^b'(.*?)(?:\\n)?'$"
_WRAPPED_DOUBLE = r'^b"(.*?)(?:\\n)?"$'


def decode_utf8(arr: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """Binary or string column -> (string column, bool `undecodable` mask).

    Fast path: one vectorized validation of the whole array. Only when it fails (some row is not UTF-8)
    do we fall back to decoding row by row, so that one bad row is rejected instead of the whole file.
    Undecodable rows come back with the text decoded with backslash escapes (for the rejects file).
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not (pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)):
        arr = arr.cast(pa.large_binary() if pa.types.is_large_string(arr.type) else pa.binary())
    as_binary = arr.cast(pa.binary())
    try:
        return as_binary.cast(pa.string()), pa.array(np.zeros(len(as_binary), dtype=bool))  # C++ UTF-8 check
    except pa.ArrowInvalid:
        pass
    texts, bad = [], []
    for v in as_binary.to_pylist():
        if v is None:
            texts.append(None)
            bad.append(False)
            continue
        try:
            texts.append(v.decode("utf-8"))
            bad.append(False)
        except UnicodeDecodeError:
            texts.append(v.decode("utf-8", errors="backslashreplace"))
            bad.append(True)
    return pa.array(texts, pa.string()), pa.array(bad, pa.bool_())


def strip_wrapper(arr: pa.Array) -> pa.Array:
    """Remove the b'...\\n' wrapper where present; other strings pass through unchanged."""
    arr = pc.replace_substring_regex(arr, pattern=_WRAPPED_SINGLE, replacement=r"\1")
    return pc.replace_substring_regex(arr, pattern=_WRAPPED_DOUBLE, replacement=r"\1")


def normalize_whitespace(arr: pa.Array) -> pa.Array:
    arr = pc.replace_substring_regex(arr, pattern=r"\s+", replacement=" ")
    return pc.utf8_trim_whitespace(arr)


def clean_text(arr: pa.Array) -> pa.Array:
    """The whole cleaning of one text column (already valid UTF-8)."""
    return normalize_whitespace(strip_wrapper(arr))
