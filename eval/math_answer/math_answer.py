"""mathtune's answer metrics as a local `evaluate` module, for notebooks and other harnesses:

    import evaluate
    metric = evaluate.load("eval/math_answer")          # a local path: never a hub download
    metric.compute(predictions=["-06 </s>", "21"], references=["-6", "12"])
    # {'exact_match': 0.5, 'f1': 1.0, 'f1_micro': 1.0, 'n': 2}

The definitions live in eval/metrics.py (normalization, bag-of-characters F1); this file only adapts
them to evaluate's Metric interface, so `python -m eval` and this module can never disagree.
"""

import datasets
import evaluate

from eval.metrics import aggregate, score_columns

_DESCRIPTION = (
    "Exact match and F1 for DeepMind Mathematics answers. Answers are normalized (whitespace, special "
    "tokens such as </s> and <pad> removed; numbers compared by value, so '-06' == '-6'). F1 is the "
    "bag-of-characters overlap of the normalized answers: mean per example ('f1') and corpus-level micro "
    "F1 from summed counts ('f1_micro')."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of str, the model's decoded answers.
    references: list of str, the gold answers.
Returns:
    exact_match (float), f1 (float, mean per example), f1_micro (float), n (int).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MathAnswer(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        m = aggregate(score_columns(predictions, references))
        return {"exact_match": m["exact_match"], "f1": m["f1"], "f1_micro": m["f1_micro"], "n": m["n"]}
