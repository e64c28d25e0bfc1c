"""Export ttq-quantized models to the engines people deploy on (issue 15, part 2).

=================  =======================================================================================
module             holds
=================  =======================================================================================
``zeropoint``      the ``int_zp`` format (integer zero-point grid of compressed-tensors / AutoAWQ / GPTQ)
``snapshot``       the TTQ snapshot: ``s`` from one text's activation statistic, quantized once (``ttq_snapshot``)
``fold``           input scales folded into the preceding norm / linear (data: ``FOLD_RULES``)
``weights``        what an exporter reads: codes, group parameters, format of each layer
``compressed``     compressed-tensors ``pack-quantized`` folders (vLLM, transformers)
``gguf``           GGUF files for llama.cpp (Q4_1 / Q5_1 / Q8_0 from ttq's codes)
``pipeline``       the steps of ``ttq export``: format per target, foldable overrides, fold + write
``report``         what was written and how far each weight moved from ttq's
=================  =======================================================================================

Nothing is registered on import; :func:`register` adds the format ``int_zp`` and the method ``ttq_snapshot`` to
ttq's tables (:func:`export_spec`, :func:`quantize_for_export`, :func:`export` and ``ttq export`` call it).

    import ttq, ttq.export
    quant = ttq.export.export_spec(ttq.QuantSpec(bits=4, group_size=32), "compressed-tensors")   # int_zp
    plan, folds = ttq.export.quantize_for_export(model, ttq.AWQConfig(quant=quant), calibration=calib)
    report = ttq.export.export(model, "out-dir", "compressed-tensors", tokenizer=tok, folds=folds)
    print(report.summary())
"""

from ttq.export.compressed import save_compressed_tensors
from ttq.export.fold import FOLD_RULES, Fold, FoldRule, fold_, plan_folds
from ttq.export.gguf import save_gguf
from ttq.export.pipeline import TARGETS, export, export_overrides, export_spec, quantize_for_export, register
from ttq.export.report import ExportReport, LayerExport
from ttq.export.snapshot import TTQSnapshotConfig, text_statistics
from ttq.export.weights import QuantizedWeight, quantized_weights

__all__ = [
    "FOLD_RULES", "TARGETS", "ExportReport", "Fold", "FoldRule", "LayerExport", "QuantizedWeight",
    "TTQSnapshotConfig", "export", "export_overrides", "export_spec", "fold_", "plan_folds", "quantize_for_export",
    "quantized_weights", "register", "save_compressed_tensors", "save_gguf", "text_statistics",
]
