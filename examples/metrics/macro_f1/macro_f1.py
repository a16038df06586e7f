"""Macro-F1 as a local `evaluate` metric: loadable offline, `evaluate.load("examples/metrics/macro_f1")`.

`evaluate.load("f1")` fetches its script from the Hub, which fails without a network; a folder holding a script of
the same name (`macro_f1/macro_f1.py`) is loaded from disk instead. The score is scikit-learn's
`f1_score(average="macro")`, the definition of `peft_c2a.federated.classification_metrics`: classes are the union of
true and predicted labels, and a class that is predicted but never true scores 0.

    python examples/federated_text_classification.py --metric examples/metrics/macro_f1
"""

import datasets
import evaluate
from sklearn.metrics import f1_score

_DESCRIPTION = "Unweighted mean over classes of each class's F1 (scikit-learn's f1_score with average='macro')."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): true class ids.
Returns:
    macro_f1 (`float`): in [0, 1].
Examples:
    >>> metric = evaluate.load("examples/metrics/macro_f1")
    >>> metric.compute(predictions=[0, 0, 2], references=[0, 0, 0])
    {'macro_f1': 0.4}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MacroF1(evaluate.Metric):
    """Macro-F1 of class ids."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            reference_urls=[],
        )

    def _compute(self, predictions, references):
        return {"macro_f1": float(f1_score(references, predictions, average="macro", zero_division=0))}
