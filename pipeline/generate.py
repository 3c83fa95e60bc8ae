"""DeepMind's own generator (`mathematics_dataset`), one shard at a time, deterministically.

Each shard seeds Python's `random` and numpy's global state (the generator draws from both) with a seed
derived from (seed, module, regime, shard index), so a shard's rows depend on nothing else: same config,
same rows, in any process, in any order. algebra__linear_1d costs ~0.65 ms per row on one core of this
VM with the sympy fast paths below (1.4 ms without; some modules far more: comparison__sort_more
seconds), which is why shards run as parallel Ray tasks.

The generator's output also depends on Python's string-hash seed (it iterates over sets of strings
somewhere inside sympy/the modules: measured, the same seed with PYTHONHASHSEED 0 vs 1 gives different rows
in 117 of its 239 module x regime pairs). So the worker processes that generate run with PYTHONHASHSEED
fixed (WORKER_ENV, set through Ray's runtime_env). Its composed modules also depended on object addresses
(_expand_entities_in_order), which no environment variable fixes.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import sys
import types

import numpy as np

WORKER_ENV = {"PYTHONHASHSEED": "0"}

log = logging.getLogger("mathtune.pipeline")
_generate = None  # the imported, initialized `mathematics_dataset.generate` module of this process


def shard_seed(seed: int, module: str, regime: str, shard: int) -> int:
    digest = hashlib.sha256(f"{seed}/{module}/{regime}/{shard}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class _ItemsetArray(np.ndarray):
    """ndarray with numpy 1's `itemset` (removed in numpy 2), which the generator's polynomial sampler
    calls: without it every module that samples polynomials (half of them, e.g. linear_1d_composed,
    calculus__differentiate, polynomials__*) fails with AttributeError."""

    def itemset(self, *args):
        *index, value = args
        index = index[0] if len(index) == 1 else tuple(index)
        if isinstance(index, (int, np.integer)):
            self.flat[index] = value  # itemset(i, v) indexes the flattened array
        else:
            self[index] = value


def _numpy2_compat() -> None:
    """Give the generator's polynomial sampler a numpy with `np.object` and `ndarray.itemset` back.
    Only that module sees the shim; the values drawn are the same (same calls into numpy's RNG)."""
    from mathematics_dataset.sample import polynomials

    if getattr(polynomials.np, "_mathtune_shim", False):
        return
    shim = types.ModuleType("numpy")
    shim.__dict__.update(np.__dict__)
    shim.object = object
    shim.zeros = lambda *a, **k: np.zeros(*a, **k).view(_ItemsetArray)
    shim.empty = lambda *a, **k: np.empty(*a, **k).view(_ItemsetArray)
    shim._mathtune_shim = True
    polynomials.np = shim


def _expand_entities_in_order(context, **kwargs):
    """The generator's composition.expand_entities (Apache-2.0, DeepMind), with one change: the entities
    are de-duplicated in insertion order instead of through a set(). Entity hashes are object addresses,
    so the set's order, and with it the order `random.shuffle` starts from, changed from process to
    process: the composed modules (e.g. numbers__gcd_composed, polynomials__add) gave different rows for
    the same seed ("Let p be ... Suppose ..." or "Suppose ... Let p be ...": 70 of the generator's 239
    module x regime pairs). The same random draws shuffle a list of the same entities, so the rows'
    distribution is the generator's."""
    from mathematics_dataset.util import composition

    kwargs = kwargs.copy()
    entities = dict.fromkeys(context.child_entities)
    for key, maybe_entity in kwargs.items():
        if isinstance(maybe_entity, composition.Entity):
            entities[maybe_entity] = None
            kwargs[key] = maybe_entity.handle
    entities = list(entities)
    random.shuffle(entities)

    child_descriptions = []
    for entity in entities:
        child_descriptions.append(entity.child_description)
        if not entity.expression_used:
            child_descriptions.append(entity.description)
    return " ".join([s for s in child_descriptions if s]), kwargs


def _exact_det(rows) -> int:
    """The determinant of a small integer matrix, exactly (Python ints); sympy's beyond 2 x 2."""
    if len(rows) == 1:
        return rows[0][0]
    if len(rows) == 2:
        return rows[0][0] * rows[1][1] - rows[0][1] * rows[1][0]
    import sympy

    return sympy.det(sympy.Matrix(rows))


def _int_gcd(*args, **kwargs):
    """sympy.gcd, through math.gcd when given two Python ints (the same value in well under a microsecond,
    where sympy.gcd takes ~240 us)."""
    import sympy

    if len(args) == 2 and not kwargs and all(type(a) is int for a in args):
        return math.gcd(*args)
    return sympy.gcd(*args, **kwargs)


def _sympy_fast_paths() -> None:
    """Two sympy calls on plain ints that were about half of algebra__linear_1d's generation time (removing
    them made a row 2.2x cheaper): `sympy.gcd(value, coprime_to)` in number.integer (~4-5 calls per row,
    almost all with coprime_to 1; sympy converts both ints to polynomials first, ~240 us a call) and
    `sympy.det(sympy.Matrix(m))` in linear_system's invertibility check (a 1 x 1 matrix for linear_1d).
    The same values come back, exactly (integers;
    no random draw is added or removed), so the rows are the same (checked against the unpatched generator
    on all 239 module x regime pairs, bench/RESULTS.md; a test keeps five). Only those two generator
    modules see the change, as with _numpy2_compat."""
    import sympy
    from mathematics_dataset.sample import linear_system, number

    if getattr(number.sympy, "_mathtune_shim", False):
        return
    for module, overrides in ((number, {"gcd": _int_gcd}),
                              (linear_system, {"det": _exact_det, "Matrix": lambda rows: rows})):
        shim = types.ModuleType("sympy")
        shim.__dict__.update(sympy.__dict__)
        shim.__dict__.update(overrides)
        shim._mathtune_shim = True
        module.sympy = shim


def _load_generator():
    """Import and initialize the generator once per process (building all modules takes ~1 s)."""
    global _generate
    if _generate is not None:
        return _generate
    # mathematics_dataset (2019) imports `base_solution_linear` from sympy.solvers.diophantine, which
    # sympy >= 1.7 moved into the submodule of the same name. Put it back on the package module object
    # (`import sympy.solvers.diophantine as d` would give the *function* diophantine, hence sys.modules).
    import sympy.solvers.diophantine  # noqa: F401
    from sympy.solvers.diophantine.diophantine import base_solution_linear

    package = sys.modules["sympy.solvers.diophantine"]
    if not hasattr(package, "base_solution_linear"):
        package.base_solution_linear = base_solution_linear

    from absl import flags
    from mathematics_dataset import generate

    if not flags.FLAGS.is_parsed():
        flags.FLAGS(["mathtune"])  # the generator reads absl flags; parse none of ours
    _numpy2_compat()
    from mathematics_dataset.util import composition

    composition.expand_entities = _expand_entities_in_order  # Entity.__init__ and example.question call it
    _sympy_fast_paths()
    generate.init_modules(train_split=True)
    _generate = generate
    return generate


# The generator asserts on its own rare bad draws: linear_system splits entropy with
# np.random.dirichlet(max(1e-9, count - 1)), whose term for a single-coefficient slot is exactly 0 except
# about once in a million draws (a gamma(1e-9) sample that does not underflow; measured: 3 in 3M), and
# then integers_with_sum's `assert entropy == 0` fires: ~1 sample in a few hundred thousand of linear_1d,
# so a 2M-row run hit it (GPU device check, 2026-11-27). Such a sample is skipped like the generator's
# own length-cap skips; many in a row is not bad luck but a broken generator, and raises.
MAX_ASSERT_RETRIES = 20


def _sample(generate, fn, module: str):
    """One (problem, skipped) from the generator, retrying its rare internal assertion failures."""
    for attempt in range(MAX_ASSERT_RETRIES + 1):
        try:
            problem, n_dropped = generate.sample_from_module(fn)
            return problem, n_dropped + attempt
        except AssertionError as e:
            last = e
    raise RuntimeError(f"the generator's {module} failed its own assertion {MAX_ASSERT_RETRIES + 1} times in a "
                       f"row (not a rare bad draw: check the mathematics_dataset/sympy/numpy versions)") from last


def generate_rows(module: str, regime: str, rows: int, seed: int) -> tuple[list[str], list[str], int]:
    """`rows` (question, answer) pairs of `module` at `regime`; also how many samples the generator
    itself skipped for exceeding its length caps (not rows of ours: counted in the manifest as
    generator_skipped_samples)."""
    generate = _load_generator()
    if os.environ.get("PYTHONHASHSEED") != WORKER_ENV["PYTHONHASHSEED"]:
        log.warning("PYTHONHASHSEED is not %s in this process: generated rows will not be reproducible",
                    WORKER_ENV["PYTHONHASHSEED"])
    modules = generate.filtered_modules.get(regime)
    if modules is None:
        raise ValueError(f"unknown regime {regime!r}; the generator has {sorted(generate.filtered_modules)}")
    if module not in modules:
        raise ValueError(f"unknown module {module!r} for regime {regime!r}; e.g. {sorted(modules)[:8]} ...")
    random.seed(seed)
    np.random.seed(seed)
    # sympy draws from its own Random instance (sympy.core.random.rng, seeded from the OS at import), e.g.
    # in the primality tests behind numbers__is_prime: unseeded, that module's rows differed run to run.
    import sympy.core.random

    sympy.core.random.seed(seed)
    fn = modules[module]
    questions, answers, dropped = [], [], 0
    for _ in range(rows):
        problem, n_dropped = _sample(generate, fn, module)
        dropped += n_dropped
        questions.append(str(problem.question))
        answers.append(str(problem.answer))
    return questions, answers, dropped
