"""DeepMind modules and the form of their answers: which modules exist, which extrapolation test module
belongs to which, and the regex an answer of each module must match in full (else: reject answer_form).

Pure data and pure functions (no generator import): the driver checks module names before Ray starts.
The forms were read off the generator's own samples of every module (tests/test_pipeline_units.py keeps
examples of each form, accepted and malformed) and are deliberately no stricter than the generator: a
false reject would silently thin a module out, a missed malformed answer only costs one row.
Patterns are RE2 syntax (Arrow compute, vectorized); `answer_form_failed` anchors them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_INT = r"-?\d+"
_DEC = r"-?\d+\.\d+(?:e-?\d+)?"
_FRAC = r"-?\d+/\d+"
_NUM = rf"(?:{_DEC}|{_FRAC}|{_INT})"
_VAR = r"[a-z]"
# A sympy expression as the generator prints it: polynomials, powers (**), sqrt(...), fractions, parens.
_EXPR = r"[-+*/() .a-z0-9]*[a-z0-9][-+*/() .a-z0-9]*"

FORMS = {
    "integer": _INT,  # -18
    "number": _NUM,  # -2812.15, 3/56581, 1703/564, 0.000297183, 7
    "number_or_variable": rf"{_NUM}|{_VAR}",  # comparison__closest: -0.5 or d
    "boolean": r"True|False",
    "comparison": rf"True|False|{_NUM}|{_VAR}",  # comparison__pair: True, -3226, 3.8, v
    "integer_list": rf"{_INT}(?:, {_INT})*",  # numbers__list_prime_factors: 59, 67, 257
    "list": rf"(?:{_NUM}|{_VAR})(?:, (?:{_NUM}|{_VAR}))*",  # comparison__sort: 5, 2, 0.4, -1/7, k
    "roots": rf"{_NUM}(?:, {_NUM})*|{_EXPR}",  # polynomial_roots: -1, 7, 8 or a factored polynomial
    "base_number": r"-?[0-9a-z]+",  # add_or_sub_in_base / base_conversion: -4c46, 2a9
    "time": rf"\d{{1,2}}:\d{{2}} [AP]M|{_INT}",  # measurement__time: 2:48 PM, or 265 (minutes)
    "expression": _EXPR,  # -2021*b**3 + 6*b - 11, 128*sqrt(11) + 45057, x**(-11586/77)
}

# Every module of the generator (its train and interpolate regimes) and the form of its answers.
MODULE_FORMS = {
    "algebra__linear_1d": "integer", "algebra__linear_1d_composed": "integer",
    "algebra__linear_2d": "integer", "algebra__linear_2d_composed": "integer",
    "algebra__polynomial_roots": "roots", "algebra__polynomial_roots_composed": "roots",
    "algebra__sequence_next_term": "integer", "algebra__sequence_nth_term": "expression",
    "arithmetic__add_or_sub": "number", "arithmetic__add_or_sub_in_base": "base_number",
    "arithmetic__add_sub_multiple": "integer", "arithmetic__div": "number", "arithmetic__mixed": "number",
    "arithmetic__mul": "number", "arithmetic__mul_div_multiple": "number",
    "arithmetic__nearest_integer_root": "integer", "arithmetic__simplify_surd": "expression",
    "calculus__differentiate": "expression", "calculus__differentiate_composed": "expression",
    "comparison__closest": "number_or_variable", "comparison__closest_composed": "number_or_variable",
    "comparison__kth_biggest": "number_or_variable", "comparison__kth_biggest_composed": "number_or_variable",
    "comparison__pair": "comparison", "comparison__pair_composed": "comparison",
    "comparison__sort": "list", "comparison__sort_composed": "list",
    "measurement__conversion": "number", "measurement__time": "time",
    "numbers__base_conversion": "base_number",
    "numbers__div_remainder": "integer", "numbers__div_remainder_composed": "integer",
    "numbers__gcd": "integer", "numbers__gcd_composed": "integer",
    "numbers__is_factor": "boolean", "numbers__is_factor_composed": "boolean",
    "numbers__is_prime": "boolean", "numbers__is_prime_composed": "boolean",
    "numbers__lcm": "integer", "numbers__lcm_composed": "integer",
    "numbers__list_prime_factors": "integer_list", "numbers__list_prime_factors_composed": "integer_list",
    "numbers__place_value": "integer", "numbers__place_value_composed": "integer",
    "numbers__round_number": "number", "numbers__round_number_composed": "number",
    "polynomials__add": "expression", "polynomials__coefficient_named": "number",
    "polynomials__collect": "expression", "polynomials__compose": "expression",
    "polynomials__evaluate": "number", "polynomials__evaluate_composed": "number",
    "polynomials__expand": "expression", "polynomials__simplify_power": "expression",
    "probability__swr_p_level_set": "number", "probability__swr_p_sequence": "number",
}
MODULES = tuple(MODULE_FORMS)

# The generator's extrapolation test modules (regime `extrapolate`), by the module they extend: larger
# numbers, longer expressions, more samples. Their rows keep the base module's name in `module`, so a
# module's interpolate and extrapolate scores sit side by side.
EXTRAPOLATE = {
    "algebra__polynomial_roots": "algebra__polynomial_roots_big",
    "arithmetic__add_or_sub": "arithmetic__add_or_sub_big",
    "arithmetic__add_sub_multiple": "arithmetic__add_sub_multiple_longer",
    "arithmetic__div": "arithmetic__div_big",
    "arithmetic__mixed": "arithmetic__mixed_longer",
    "arithmetic__mul": "arithmetic__mul_big",
    "arithmetic__mul_div_multiple": "arithmetic__mul_div_multiple_longer",
    "comparison__closest": "comparison__closest_more",
    "comparison__kth_biggest": "comparison__kth_biggest_more",
    "comparison__sort": "comparison__sort_more",
    "measurement__conversion": "measurement__conversion",
    "numbers__place_value": "numbers__place_value_big",
    "numbers__round_number": "numbers__round_number_big",
    "probability__swr_p_level_set": "probability__swr_p_level_set_more_samples",
    "probability__swr_p_sequence": "probability__swr_p_sequence_more_samples",
}
BASE_OF_EXTRAPOLATE = {v: k for k, v in EXTRAPOLATE.items()}


def module_of_name(name: str) -> str | None:
    """A file or folder name -> the module it holds (an extrapolation module's name -> its base), or None."""
    if name in MODULE_FORMS:
        return name
    return BASE_OF_EXTRAPOLATE.get(name)


def answer_pattern(module: str, override: str = "auto") -> str | None:
    """The regex answers of `module` must match: the module's form (`auto`; None for a module we do not
    know), no check (`none`), or the user's own pattern for every module."""
    if override == "none":
        return None
    if override != "auto":
        return override
    form = MODULE_FORMS.get(module)
    return FORMS[form] if form else None


def answer_form_failed(answers: pa.Array, modules: pa.Array, override: str = "auto") -> pa.Array:
    """Bool per row: the answer does not match its module's form in full (null answers fail; rows of a
    module without a known form pass). One regex pass per distinct pattern, over only its rows: a batch
    mixing many modules costs about what a one-module batch does (one module per batch, usually)."""
    answers = pc.fill_null(answers, "")
    by_pattern: dict[str, list[str]] = {}
    for module in pc.unique(modules).to_pylist():
        pattern = answer_pattern(module, override) if module is not None else None
        if pattern is not None:
            by_pattern.setdefault(pattern, []).append(module)
    failed = np.zeros(len(answers), dtype=bool)
    for pattern, mods in by_pattern.items():
        rows = np.flatnonzero(pc.is_in(modules, value_set=pa.array(mods, pa.string())).fill_null(False)
                              .to_numpy(zero_copy_only=False))
        if len(rows) == 0:
            continue
        subset = answers if len(rows) == len(answers) else answers.take(pa.array(rows))
        failed[rows] = pc.invert(pc.match_substring_regex(subset, pattern=f"^(?:{pattern})$")).to_numpy(
            zero_copy_only=False)
    return pa.array(failed)
