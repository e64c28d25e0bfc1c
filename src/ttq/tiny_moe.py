"""Small random mixture-of-experts models of the families transformers ships with fused experts.

No trained MoE checkpoint is reachable offline; these build a real transformers model of each family
from its config (random weights), for tests and for timing the per-expert pipeline.  The family table
is data: config keyword arguments per ``model_type`` that name the number of experts, experts per token
and expert width in that family's own vocabulary.  A user with internet loads the real checkpoints by
hub id (``ttq.models.load_model("Qwen/Qwen3-30B-A3B")``).
"""

from __future__ import annotations

import torch

from ttq.errors import ConfigError

# model_type -> config kwargs (E experts, k per token, expert width I) in the family's own names
MOE_FAMILIES: dict[str, dict] = {
    "qwen3_moe": {"num_experts": "E", "num_experts_per_tok": "k", "moe_intermediate_size": "I", "head_dim": "D"},
    "qwen2_moe": {"num_experts": "E", "num_experts_per_tok": "k", "moe_intermediate_size": "I",
                  "shared_expert_intermediate_size": "I"},
    "mixtral": {"num_local_experts": "E", "num_experts_per_tok": "k", "intermediate_size": "I", "head_dim": "D"},
    "olmoe": {"num_experts": "E", "num_experts_per_tok": "k", "intermediate_size": "I"},
    "deepseek_v3": {"n_routed_experts": "E", "num_experts_per_tok": "k", "moe_intermediate_size": "I",
                    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 0, "q_lora_rank": None,
                    "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
                    "num_key_value_heads": 2},
    "gpt_oss": {"num_local_experts": "E", "num_experts_per_tok": "k", "intermediate_size": "I", "head_dim": "D"},
}


def tiny_moe(family: str, hidden: int = 64, experts: int = 4, top_k: int = 2, expert_width: int = 32,
             layers: int = 2, vocab: int = 128, seed: int = 0) -> torch.nn.Module:
    """A random ``family`` causal LM (float32, eval mode) with fused experts.

    Args:
        family: a key of :data:`MOE_FAMILIES` (a transformers ``model_type``).
        hidden: model width; experts / top_k / expert_width: E, k and I; layers: decoder blocks.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if family not in MOE_FAMILIES:
        raise ConfigError(f"unknown MoE family {family!r}; allowed: {', '.join(MOE_FAMILIES)}")
    values = {"E": experts, "k": top_k, "I": expert_width, "D": hidden // 2}
    kw = {k: values.get(v, v) if isinstance(v, str) else v for k, v in MOE_FAMILIES[family].items()}
    base = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": vocab,
            "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    cfg = AutoConfig.for_model(family, **{**base, **kw})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # transformers initialises some expert tensors to zero; give every expert a spectrum
        for name, p in model.named_parameters():
            if p.dim() == 3 or name.endswith("_bias"):
                p.normal_(0.0, 0.05)
    return model
