"""Save and load quantized models (issue 15): ``ttq.save_pretrained`` writes a Hugging Face folder,
``transformers.AutoModelForCausalLM.from_pretrained`` (or :func:`load_pretrained`, which checks the
folder first) reads it back after ``import ttq``.

=================  ==================================================================
module             holds
=================  ==================================================================
``format``         the on-disk format: version, packed code layout, header checks
``codecs``         one codec per quantized module type: ``module <-> (args, tensors)``
``records``        the ``quantization_config`` of config.json, built and parsed
``save``           :func:`save_pretrained`
``hf_quantizer``   the transformers quantizer that rebuilds the modules on loading
=================  ==================================================================
"""

from ttq.checkpoint.codecs import CODECS, Codec, register_codec
from ttq.checkpoint.format import FORMAT_VERSION, pack_codes, unpack_codes
from ttq.checkpoint.hf_quantizer import TTQHfQuantizer, TTQQuantizationConfig, load_pretrained, register
from ttq.checkpoint.save import SaveReport, check_output_dir, save_pretrained

register()

__all__ = [
    "CODECS", "FORMAT_VERSION", "Codec", "SaveReport", "TTQHfQuantizer", "TTQQuantizationConfig", "check_output_dir",
    "load_pretrained", "pack_codes", "register", "register_codec", "save_pretrained", "unpack_codes",
]
