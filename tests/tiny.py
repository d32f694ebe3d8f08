"""Tiny models of every supported family, built with transformers' own config classes.

Used by the tests, the benchmarks and the demo's fallback teacher: nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import torch

_COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128)

# Per family: tiny config overrides. Each exercises what is special about the family: shared
# experts, already-dense layers narrower or wider than the student, MLA attention, sinks, biases.
TINY: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(moe_intermediate_size=8, intermediate_size=40, num_experts=6, num_experts_per_tok=2,
                      head_dim=8, norm_topk_prob=True, mlp_only_layers=[0], num_hidden_layers=3),
    "qwen2_moe": dict(moe_intermediate_size=8, intermediate_size=24, shared_expert_intermediate_size=12,
                      num_experts=6, num_experts_per_tok=2, qkv_bias=False),
    "mixtral": dict(intermediate_size=8, num_local_experts=6, num_experts_per_tok=2),
    "olmoe": dict(intermediate_size=8, num_experts=6, num_experts_per_tok=2),
    "deepseek_v2": dict(moe_intermediate_size=8, intermediate_size=24, n_routed_experts=6, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=None,
                        qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=4, n_group=2, topk_group=1,
                        topk_method="group_limited_greedy", routed_scaling_factor=1.5, num_hidden_layers=3,
                        num_key_value_heads=4),  # MLA: as many KV heads as heads (real configs do)
    "deepseek_v3": dict(moe_intermediate_size=8, intermediate_size=24, n_routed_experts=6, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=8,
                        qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=4, n_group=2, topk_group=1,
                        routed_scaling_factor=2.5, norm_topk_prob=True, num_hidden_layers=3, num_key_value_heads=4,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "glm4_moe": dict(moe_intermediate_size=8, intermediate_size=24, n_routed_experts=6, num_experts_per_tok=2,
                     n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                     norm_topk_prob=True, num_hidden_layers=3, head_dim=8, use_qk_norm=True),
    "glm4_moe_lite": dict(moe_intermediate_size=8, intermediate_size=24, n_routed_experts=6, num_experts_per_tok=2,
                          n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=1.8, norm_topk_prob=True,
                          num_hidden_layers=3, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16,
                          qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8),
    "deepseek_v32": dict(moe_intermediate_size=8, intermediate_size=24, n_routed_experts=6, num_experts_per_tok=2,
                         n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, norm_topk_prob=True,
                         num_hidden_layers=3, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16,
                         qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, index_topk=8, index_n_heads=2,
                         index_head_dim=8),
    "qwen3_next": dict(moe_intermediate_size=8, intermediate_size=24, shared_expert_intermediate_size=12,
                       num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=4, head_dim=8,
                       mlp_only_layers=[1], linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                       linear_value_head_dim=8),
    "qwen3_5_moe_text": dict(moe_intermediate_size=8, shared_expert_intermediate_size=12, num_experts=6,
                             num_experts_per_tok=2, num_hidden_layers=4, head_dim=8, linear_num_key_heads=2,
                             linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8),
    "ernie4_5_moe": dict(moe_intermediate_size=8, intermediate_size=24, moe_num_experts=6, moe_k=2,
                         moe_num_shared_experts=1, num_hidden_layers=3, moe_layer_start_index=1),
    "granitemoe": dict(intermediate_size=8, num_local_experts=6, num_experts_per_tok=2, embedding_multiplier=2.0,
                       attention_multiplier=0.3, residual_multiplier=0.5, logits_scaling=2.0),
    "dots1": dict(moe_intermediate_size=8, intermediate_size=24, n_routed_experts=6, num_experts_per_tok=2,
                  n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.0,
                  norm_topk_prob=True, num_hidden_layers=3, head_dim=8),
    "exaone_moe": dict(moe_intermediate_size=8, intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                       num_shared_experts=1, head_dim=8, num_hidden_layers=3, first_k_dense_replace=1,
                       layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                       mlp_layer_types=["dense", "sparse", "sparse"]),
    "mimo_v2_flash": dict(moe_intermediate_size=8, intermediate_size=24, n_routed_experts=6, num_experts_per_tok=2,
                          head_dim=8, v_head_dim=8, num_hidden_layers=3,
                          layer_types=["full_attention", "sliding_attention", "full_attention"],
                          mlp_layer_types=["dense", "sparse", "sparse"]),
    "afmoe": dict(moe_intermediate_size=8, intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                  num_shared_experts=1, num_dense_layers=1, head_dim=8, num_hidden_layers=3,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    "hunyuan_v1_moe": dict(intermediate_size=8, num_experts=6, moe_topk=2, head_dim=8),
    "flex_olmo": dict(intermediate_size=8, num_experts=6, num_experts_per_tok=2, pad_token_id=1),
    "minimax": dict(intermediate_size=8, num_local_experts=6, num_experts_per_tok=2, head_dim=8, num_hidden_layers=3,
                    layer_types=["full_attention", "linear_attention", "full_attention"]),
    "minimax_m2": dict(intermediate_size=8, num_local_experts=6, num_experts_per_tok=2, head_dim=8),
    "lfm2_moe": dict(moe_intermediate_size=8, intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                     num_dense_layers=1, num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"]),
    "jamba": dict(intermediate_size=8, num_experts=6, num_experts_per_tok=2, num_hidden_layers=4,
                  attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  use_mamba_kernels=False, mamba_d_state=4, mamba_expand=2, mamba_dt_rank=4),
    "solar_open": dict(moe_intermediate_size=8, n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=1,
                       n_group=2, topk_group=1, routed_scaling_factor=2.0, norm_topk_prob=True, head_dim=8),
    "cohere2_moe": dict(intermediate_size=8, num_experts=6, num_experts_per_tok=2, num_shared_experts=1,
                        shared_expert_combination_strategy="sum", head_dim=8, num_hidden_layers=3,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                        mlp_layer_types=["dense", "sparse", "sparse"], prefix_dense_intermediate_size=24),
    "laguna": dict(moe_intermediate_size=8, intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                   shared_expert_intermediate_size=8, moe_routed_scaling_factor=2.0, head_dim=8, num_hidden_layers=3,
                   layer_types=["full_attention"] * 3, mlp_layer_types=["dense", "sparse", "sparse"]),
    "gpt_oss": dict(intermediate_size=8, num_local_experts=6, num_experts_per_tok=2, head_dim=8,
                    layer_types=["sliding_attention", "full_attention"], sliding_window=16,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}

FAMILY_NAMES = tuple(TINY)


def tiny_config(model_type: str, *, uniform_router: bool = False, **overrides: Any):
    """A tiny config; `uniform_router` routes every token to all experts (top_k = E)."""
    from transformers import AutoConfig

    kw = {**_COMMON, **TINY[model_type], **overrides}
    if uniform_router:
        E = next(kw[a] for a in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts") if a in kw)
        kw[next((a for a in ("moe_k", "moe_topk") if a in kw), "num_experts_per_tok")] = E
        if "n_group" in kw:
            kw["n_group"], kw["topk_group"] = 1, 1
    return AutoConfig.for_model(model_type, **kw)


def make_tiny_moe(model_type: str, path: str | None = None, *, uniform_router: bool = False, seed: int = 0,
                  tokenizer=None, scale: float = 0.3, dtype: torch.dtype = torch.float32, **overrides: Any):
    """Build (and optionally save) a tiny random MoE of `model_type`.

    Weights are drawn larger than the usual 0.02 init so that every expert visibly changes the
    logits: an exactness test on near-zero experts could not fail. With `uniform_router` the
    router weights (and biases, shared-expert gate, score-correction bias) are zero, so every
    expert gets the same gate on every token.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(model_type, uniform_router=uniform_router, **overrides)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 or "bias" in name:
                p.normal_(0.0, scale)
        if uniform_router:
            from moe2dense_ray.core.families import get_family

            family = get_family(model_type)
            router = f".{family.moe_module}.{family.router_module}."
            for name, p in model.named_parameters():
                if router in name or "shared_expert_gate" in name \
                        or "e_score_correction_bias" in name or "expert_bias" in name:
                    p.zero_()
            for name, b in model.named_buffers():
                if "e_score_correction_bias" in name or "expert_bias" in name:
                    b.zero_()
    model.eval()
    if path is not None:
        model.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    return model
