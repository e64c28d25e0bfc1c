"""Evaluation / calibration texts and their token windows."""

from ttq.data.texts import (
    CALIB_FILES,
    DATASETS,
    EVAL_FILES,
    SOURCE_FORMS,
    TextSource,
    check_dataset,
    check_disjoint,
    dataset_label,
    load_text,
    parse_calib,
    parse_source,
    resolve_file,
)
from ttq.data.windows import C4_EVAL_WINDOWS, CalibSpec, calibration_windows, eval_windows, tokenize

__all__ = [
    "C4_EVAL_WINDOWS",
    "CALIB_FILES",
    "DATASETS",
    "EVAL_FILES",
    "SOURCE_FORMS",
    "CalibSpec",
    "TextSource",
    "calibration_windows",
    "check_dataset",
    "check_disjoint",
    "dataset_label",
    "eval_windows",
    "load_text",
    "parse_calib",
    "parse_source",
    "resolve_file",
    "tokenize",
]
