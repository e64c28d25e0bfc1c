"""Evaluation / calibration texts and their token windows."""

from ttq.data.texts import CALIB_FILES, DATASETS, EVAL_FILES, check_dataset, check_disjoint, load_text, resolve_file
from ttq.data.windows import C4_EVAL_WINDOWS, CalibSpec, calibration_windows, eval_windows, tokenize

__all__ = [
    "C4_EVAL_WINDOWS",
    "CALIB_FILES",
    "DATASETS",
    "EVAL_FILES",
    "CalibSpec",
    "calibration_windows",
    "check_dataset",
    "check_disjoint",
    "eval_windows",
    "load_text",
    "resolve_file",
    "tokenize",
]
