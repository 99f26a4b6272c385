"""The probe toolkit: the paper's features, the linear probe and sentiment unit, the evaluations,
pictures and steered generation.

    featurize(model, texts) -> [N, H] float32      tanh of the final cell state, paper preprocessing
    cell_trace(model, text, units) -> [len, U]     the cell state after every byte
    train_probe(train_x, train_y, dev_x, dev_y)    L1 logistic regression, C on dev, the sentiment unit
    data_efficiency(...)                           accuracy vs labelled examples (Fig. 2)
    evaluate(model, task)                          one of the paper's evaluations (TASKS)
    plot_unit_histogram, plot_data_efficiency,     the pictures (Fig. 3, 2, 4)
    visualize_text, text_html, text_png
    steer(model, unit)                             samples with the unit held at +1 / -1 (Table 5)
"""

from .features import cell_trace, encode_texts, featurize, preprocess
from .generate import steer
from .linear import C_GRID, DataEfficiency, LinearProbe, data_efficiency, train_probe, unit_threshold
from .plots import plot_data_efficiency, plot_unit_histogram, text_html, text_png, text_values, visualize_text
from .tasks import PAPER, TASKS, TaskResult, evaluate, fit_relatedness, pair_features

__all__ = [
    "C_GRID",
    "PAPER",
    "TASKS",
    "DataEfficiency",
    "LinearProbe",
    "TaskResult",
    "cell_trace",
    "data_efficiency",
    "encode_texts",
    "evaluate",
    "featurize",
    "fit_relatedness",
    "pair_features",
    "plot_data_efficiency",
    "plot_unit_histogram",
    "preprocess",
    "steer",
    "text_html",
    "text_png",
    "text_values",
    "train_probe",
    "unit_threshold",
    "visualize_text",
]
