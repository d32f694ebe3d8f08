"""The table of supported model families: all architecture knowledge lives here, as data.

Every code path (calibration hooks, the streaming builder, the dense config) asks this table
instead of branching on model names, so adding a family is one `Family(...)` row plus, at most,
a new expert layout or dense layout in `convert/ffn.py`.

Key templates are relative to `model.layers.{i}.` on disk. transformers 5 holds experts fused in
memory but writes per-expert keys on save (fused and interleaved for GPT-OSS); the reader also
accepts the fused in-memory layout, so checkpoints saved either way convert.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal

from .errors import UserError

# How a source checkpoint stores one layer's routed experts.
#   "per_expert": one (gate, up, down) triple of 2-D tensors per expert (names in `expert_keys`),
#                 or, as a fallback, transformers' fused `experts.gate_up_proj` [E, 2I, H] and
#                 `experts.down_proj` [E, H, I].
#   "interleaved_biased": fused `gate_up_proj` [E, H, 2I] with gate/up interleaved on the last
#                 axis, `down_proj` [E, I, H], biases for both, a clamped SwiGLU (GPT-OSS); or
#                 MXFP4 `*_blocks` + `*_scales`.
ExpertLayout = Literal["per_expert", "interleaved_biased"]

# What the student's FFN looks like on disk.
#   "mlp":        a standard dense SwiGLU `mlp.{gate,up,down}_proj` (Qwen3, Qwen2, Mistral, DeepSeek).
#   "one_expert": the same MoE class with a single expert routed with weight 1 (no dense twin in
#                 transformers: OLMoE, GPT-OSS). The layout of that one expert follows the source.
DenseLayout = Literal["mlp", "one_expert"]


@dataclass(frozen=True)
class Family:
    model_type: str
    dense_model_type: str
    dense_architecture: str
    dense_layout: DenseLayout
    expert_layout: ExpertLayout
    # config attribute names (read through the transformers config class, so defaults apply)
    experts_attr: str
    expert_size_attr: str  # intermediate size of one routed expert
    top_k_attr: str = "num_experts_per_tok"  # experts each token is routed to
    # the MoE block's name in a decoder layer in memory (calibration hooks), and on disk (None:
    # as transformers' checkpoint-conversion mapping renames it, else the same)
    moe_module: str = "mlp"
    moe_prefix: str | None = None
    router_module: str = "gate"  # child of the MoE block in memory
    router_key: str = "gate"  # on disk, relative to moe_prefix
    # each routed expert's (gate, up, down) names on disk; None: from transformers' mapping
    expert_keys: tuple[str, str, str] | None = None
    # the dense FFN's module name and its (gate, up, down) names, in the teacher's dense layers and
    # in the student (on disk and in memory alike)
    dense_prefix: str = "mlp"
    dense_keys: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    # where experts are fused on disk ([E, 2I, H] gate then up; [E, H, I]), relative to moe_prefix;
    # None: from transformers' mapping, else transformers' in-memory names
    fused_keys: tuple[str, str] | None = None
    # other (on-disk, in-memory) name pieces, from transformers' mapping (Laguna's `shared_expert.`
    # is `shared_experts.` in memory)
    disk_renames: tuple[tuple[str, str], ...] = ()
    # the router's probability over all experts, used by PP / CP statistics
    router_prob: Literal["softmax", "sigmoid"] = "softmax"
    # shared experts: on-disk/in-memory child name, and how their size is derived
    shared_prefix: str | None = None
    shared_gate: str | None = None  # Qwen2-MoE's sigmoid gate on the shared expert
    # config changes that make the dense twin's every layer dense, when the twin is the same class
    # (DeepSeek's `first_k_dense_replace = L`): a function of the number of layers L. Which layers
    # of the teacher are MoE is not stated here: transformers builds the model (on the meta device)
    # and the layers holding an `experts` module are the MoE layers.
    all_dense: Callable[[int], dict[str, Any]] | None = None
    # extra tensors in the MoE block that the student drops (e.g. e_score_correction_bias)
    router_extra_keys: tuple[str, ...] = ()
    # group-limited top-k (DeepSeek): experts split into `n_group` groups, the best `topk_group`
    # groups kept, top-k taken among their experts. "always" (V3) or only with
    # `topk_method: group_limited_greedy` (V2).
    group_topk: Literal["never", "always", "by_method"] = "never"
    # config keys that only make sense for an MoE and are removed from a dense twin's config
    moe_config_keys: tuple[str, ...] = ()
    # attention projections whose bias the dense twin always has, though the MoE may not (written
    # as zeros, which changes nothing), relative to `model.layers.{i}.`
    dense_biases: tuple[str, ...] = ()
    # a config attribute by which the MoE block multiplies its routed output after the router's
    # gates (Laguna's `moe_routed_scaling_factor`): calibration counts it as part of every gate
    gate_scale_attr: str | None = None
    # a setting of this family that the construction cannot reproduce: config -> why, or None
    refuse: Callable[[Any], str | None] | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# DeepSeek-V3's MoE, which several families reuse: sigmoid router with a score-correction bias
# (used to select, not in the gates), group-limited top-k, shared experts
_V3_ROUTING: dict[str, Any] = dict(
    experts_attr="n_routed_experts", expert_size_attr="moe_intermediate_size", router_prob="sigmoid",
    shared_prefix="shared_experts", router_extra_keys=("gate.e_score_correction_bias",), group_topk="always")


def _first_k_dense(layers: int) -> dict[str, Any]:
    return {"first_k_dense_replace": layers}


_QWEN_MOE_KEYS = (
    "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
    "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob", "output_router_logits",
    "router_aux_loss_coef", "shared_expert_intermediate_size", "qkv_bias",
)

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in [
        Family(
            model_type="qwen3_moe", dense_model_type="qwen3", dense_architecture="Qwen3ForCausalLM",
            dense_layout="mlp", expert_layout="per_expert",
            experts_attr="num_experts", expert_size_attr="moe_intermediate_size",
            moe_config_keys=_QWEN_MOE_KEYS,
            notes="Layers already dense (`mlp_only_layers`) are kept, zero-padded to the student's FFN width.",
        ),
        Family(
            model_type="qwen2_moe", dense_model_type="qwen2", dense_architecture="Qwen2ForCausalLM",
            dense_layout="mlp", expert_layout="per_expert",
            experts_attr="num_experts", expert_size_attr="moe_intermediate_size",
            shared_prefix="shared_expert", shared_gate="shared_expert_gate",
            moe_config_keys=_QWEN_MOE_KEYS,
            dense_biases=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),  # Qwen2 has q/k/v biases
            notes="The shared expert's sigmoid gate has no dense equivalent: the student scales the "
            "shared expert by the gate's mean over the calibration tokens.",
        ),
        Family(
            model_type="mixtral", dense_model_type="mistral", dense_architecture="MistralForCausalLM",
            dense_layout="mlp", expert_layout="per_expert",
            experts_attr="num_experts", expert_size_attr="intermediate_size",
            moe_config_keys=("num_local_experts", "num_experts_per_tok", "router_jitter_noise",
                             "output_router_logits", "router_aux_loss_coef"),
            notes="Mistral is Mixtral's dense twin. Checkpoints saved from transformers' fused modules "
            "(`mlp.experts.gate_up_proj`) are read as well as the per-expert `block_sparse_moe` layout.",
        ),
        Family(
            model_type="olmoe", dense_model_type="olmoe", dense_architecture="OlmoeForCausalLM",
            dense_layout="one_expert", expert_layout="per_expert",
            experts_attr="num_experts", expert_size_attr="intermediate_size",
            notes="No dense twin in transformers: the student is an OLMoE with one expert.",
        ),
        Family(
            model_type="deepseek_v2", dense_model_type="deepseek_v2",
            dense_architecture="DeepseekV2ForCausalLM", dense_layout="mlp", expert_layout="per_expert",
            experts_attr="n_routed_experts", expert_size_attr="moe_intermediate_size",
            shared_prefix="shared_experts", all_dense=_first_k_dense, group_topk="by_method",
            notes="Every layer becomes dense (`first_k_dense_replace` = layers); the first dense layers "
            "are kept, zero-padded. Shared experts are kept; group-limited top-k and "
            "`routed_scaling_factor` are read from the real router's output.",
        ),
        Family(
            model_type="deepseek_v3", dense_model_type="deepseek_v3",
            dense_architecture="DeepseekV3ForCausalLM", dense_layout="mlp", expert_layout="per_expert",
            all_dense=_first_k_dense, **_V3_ROUTING,
            notes="As deepseek_v2, with a sigmoid router and `e_score_correction_bias` (used for selection, "
            "not for gates). Block-FP8 weights (`weight_scale_inv`) are dequantized to bf16; MTP layers "
            "beyond `num_hidden_layers` are dropped.",
        ),
        Family(
            model_type="glm4_moe", dense_model_type="glm4_moe", dense_architecture="Glm4MoeForCausalLM",
            dense_layout="mlp", expert_layout="per_expert",
            all_dense=_first_k_dense, **_V3_ROUTING,
            notes="GLM-4.5: DeepSeek-V3's router and shared experts; every layer becomes dense.",
        ),
        Family(
            model_type="glm4_moe_lite", dense_model_type="glm4_moe_lite", dense_architecture="Glm4MoeLiteForCausalLM",
            dense_layout="mlp", expert_layout="per_expert",
            all_dense=lambda n: {"mlp_layer_types": ["dense"] * n}, **_V3_ROUTING,
            notes="GLM-4.7-Flash: glm4_moe's router with MLA attention; every layer becomes dense.",
        ),
        Family(
            model_type="deepseek_v32", dense_model_type="deepseek_v32", dense_architecture="DeepseekV32ForCausalLM",
            dense_layout="mlp", expert_layout="per_expert",
            all_dense=lambda n: {"first_k_dense_replace": n, "mlp_layer_types": ["dense"] * n}, **_V3_ROUTING,
            notes="As deepseek_v3, with the sparse-attention indexer kept as it is; every layer becomes dense.",
        ),
        Family(
            model_type="qwen3_next", dense_model_type="qwen3_next", dense_architecture="Qwen3NextForCausalLM",
            dense_layout="mlp", expert_layout="per_expert",
            experts_attr="num_experts", expert_size_attr="moe_intermediate_size",
            shared_prefix="shared_expert", shared_gate="shared_expert_gate",
            all_dense=lambda n: {"mlp_only_layers": list(range(n))},
            notes="Hybrid Gated-DeltaNet and attention layers copied as they are; every layer becomes dense "
            "(`mlp_only_layers`); the gated shared expert as in qwen2_moe.",
        ),
        Family(
            model_type="qwen3_5_moe_text", dense_model_type="qwen3_5_text", dense_architecture="Qwen3_5ForCausalLM",
            dense_layout="mlp", expert_layout="per_expert",
            experts_attr="num_experts", expert_size_attr="moe_intermediate_size",
            shared_prefix="shared_expert", shared_gate="shared_expert_gate", moe_config_keys=_QWEN_MOE_KEYS,
            notes="Qwen3.5's text model (hybrid linear attention); the dense Qwen3.5 is its twin; the gated "
            "shared expert as in qwen2_moe.",
        ),
        Family(
            model_type="ernie4_5_moe", dense_model_type="ernie4_5_moe", dense_architecture="Ernie4_5_MoeForCausalLM",
            dense_layout="mlp", expert_layout="per_expert",
            experts_attr="moe_num_experts", expert_size_attr="moe_intermediate_size",
            shared_prefix="shared_experts", all_dense=lambda n: {"moe_layer_start_index": n},
            router_extra_keys=("moe_statics.e_score_correction_bias",),
            notes="ERNIE 4.5: the router's score bias (`moe_statics`) only selects; every layer becomes dense.",
        ),
        Family(
            model_type="granitemoe", dense_model_type="granite", dense_architecture="GraniteForCausalLM",
            dense_layout="mlp", expert_layout="per_expert",
            experts_attr="num_local_experts", expert_size_attr="intermediate_size",
            moe_module="block_sparse_moe", router_module="router",
            moe_config_keys=("num_local_experts", "num_experts_per_tok", "output_router_logits",
                             "router_aux_loss_coef"),
            notes="Granite's embedding, attention, residual and logit multipliers are kept by the dense Granite; "
            "experts are fused on disk (`input_linear`, `output_linear`).",
        ),
        Family(
            model_type="dots1", dense_model_type="dots1", dense_architecture="Dots1ForCausalLM",
            dense_layout="mlp", expert_layout="per_expert",
            experts_attr="n_routed_experts", expert_size_attr="moe_intermediate_size",
            router_prob="sigmoid", shared_prefix="shared_experts", all_dense=_first_k_dense,
            router_extra_keys=("gate.e_score_correction_bias",),
            notes="dots.llm1: DeepSeek-V3's router and shared experts with Qwen3 attention; every layer becomes dense.",
        ),
        Family(
            model_type="exaone_moe", dense_model_type="exaone_moe", dense_architecture="ExaoneMoeForCausalLM",
            dense_layout="mlp", expert_layout="per_expert",
            experts_attr="num_experts", expert_size_attr="moe_intermediate_size",
            router_prob="sigmoid", shared_prefix="shared_experts",
            all_dense=lambda n: {"mlp_layer_types": ["dense"] * n, "first_k_dense_replace": n},
            notes="EXAONE-MoE: DeepSeek-V3-style router; every layer becomes dense (`mlp_layer_types`).",
        ),
        Family(
            model_type="mimo_v2_flash", dense_model_type="mimo_v2_flash", dense_architecture="MiMoV2FlashForCausalLM",
            dense_layout="mlp", expert_layout="per_expert",
            experts_attr="n_routed_experts", expert_size_attr="moe_intermediate_size", router_prob="sigmoid",
            all_dense=lambda n: {"mlp_layer_types": ["dense"] * n},
            notes="MiMo-V2-Flash: sigmoid router with a score bias, no shared expert, attention sinks on its "
            "sliding-window layers; every layer becomes dense.",
        ),
        Family(
            model_type="afmoe", dense_model_type="afmoe", dense_architecture="AfmoeForCausalLM",
            dense_layout="mlp", expert_layout="per_expert",
            experts_attr="num_experts", expert_size_attr="moe_intermediate_size", router_module="router",
            router_prob="sigmoid", shared_prefix="shared_experts", all_dense=lambda n: {"num_dense_layers": n},
            notes="AFMoE (Arcee Trinity): sigmoid router with an expert bias; every layer becomes dense.",
        ),
        Family(
            model_type="hunyuan_v1_moe", dense_model_type="hunyuan_v1_dense",
            dense_architecture="HunYuanDenseV1ForCausalLM", dense_layout="mlp", expert_layout="per_expert",
            experts_attr="num_experts", expert_size_attr="intermediate_size", top_k_attr="moe_topk",
            shared_prefix="shared_mlp", moe_config_keys=("num_experts", "moe_topk", "moe_intermediate_size",
                                                         "num_shared_expert", "use_mixed_mlp_moe"),
            notes="Hunyuan-A13B: the ungated shared MLP is kept; the dense Hunyuan is its twin.",
        ),
        Family(
            model_type="flex_olmo", dense_model_type="flex_olmo", dense_architecture="FlexOlmoForCausalLM",
            dense_layout="one_expert", expert_layout="per_expert",
            experts_attr="num_experts", expert_size_attr="intermediate_size",
            notes="FlexOlmo: the student is a FlexOlmo with one expert (Olmo2 attention and post-norms).",
        ),
        Family(
            model_type="minimax", dense_model_type="minimax", dense_architecture="MiniMaxForCausalLM",
            dense_layout="one_expert", expert_layout="per_expert",
            experts_attr="num_local_experts", expert_size_attr="intermediate_size",
            notes="MiniMax-Text-01: hybrid lightning and softmax attention copied as they are; no dense twin in "
            "transformers, so the student is a MiniMax with one expert.",
        ),
        Family(
            model_type="minimax_m2", dense_model_type="minimax_m2", dense_architecture="MiniMaxM2ForCausalLM",
            dense_layout="one_expert", expert_layout="per_expert",
            experts_attr="num_local_experts", expert_size_attr="intermediate_size", router_prob="sigmoid",
            router_extra_keys=("e_score_correction_bias",),
            notes="MiniMax-M2: sigmoid router with a score bias; the student is a MiniMax-M2 with one expert.",
        ),
        Family(
            model_type="lfm2_moe", dense_model_type="lfm2_moe", dense_architecture="Lfm2MoeForCausalLM",
            dense_layout="mlp", expert_layout="per_expert",
            experts_attr="num_experts", expert_size_attr="moe_intermediate_size", router_prob="sigmoid",
            moe_module="feed_forward", dense_prefix="feed_forward", dense_keys=("w1", "w3", "w2"),
            router_extra_keys=("expert_bias",),
            all_dense=lambda n: {"num_dense_layers": n},
            notes="LFM2-MoE: short-convolution and attention layers copied as they are; sigmoid router with an "
            "expert bias; every layer becomes dense (`num_dense_layers`).",
        ),
        Family(
            model_type="jamba", dense_model_type="jamba", dense_architecture="JambaForCausalLM",
            dense_layout="mlp", expert_layout="per_expert",
            experts_attr="num_experts", expert_size_attr="intermediate_size", router_module="router",
            moe_module="feed_forward", dense_prefix="feed_forward", all_dense=lambda n: {"num_experts": 1},
            notes="Jamba: Mamba and attention layers copied as they are; every layer becomes dense (`num_experts` "
            "1), already-dense layers kept.",
        ),
        Family(
            model_type="solar_open", dense_model_type="llama", dense_architecture="LlamaForCausalLM",
            dense_layout="mlp", expert_layout="per_expert",
            experts_attr="n_routed_experts", expert_size_attr="moe_intermediate_size", router_prob="sigmoid",
            shared_prefix="shared_experts", router_extra_keys=("gate.e_score_correction_bias",),
            moe_config_keys=("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_shared_experts",
                             "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor",
                             "num_local_experts"),
            notes="Solar Open: DeepSeek-V3's router and shared experts on Llama attention; Llama is its twin.",
        ),
        Family(
            model_type="cohere2_moe", dense_model_type="cohere2", dense_architecture="Cohere2ForCausalLM",
            dense_layout="mlp", expert_layout="per_expert",
            experts_attr="num_experts", expert_size_attr="intermediate_size", shared_prefix="shared_experts",
            moe_config_keys=("num_experts", "num_experts_per_tok", "num_shared_experts", "norm_topk_prob",
                             "shared_expert_combination_strategy", "expert_selection_fn", "mlp_layer_types",
                             "prefix_dense_intermediate_size", "prefix_dense_sliding_window_pattern",
                             "output_router_logits", "router_aux_loss_coef"),
            refuse=lambda c: ("its shared experts are averaged with the routed ones "
                              "(shared_expert_combination_strategy: average), which the dense FFN does not "
                              "reproduce yet" if getattr(c, "num_shared_experts", 0) and
                              getattr(c, "shared_expert_combination_strategy", "sum") == "average" else None),
            notes="Command A MoE: parallel attention and FFN; the dense Cohere2 is its twin. Shared experts are "
            "supported when summed (`shared_expert_combination_strategy: sum`).",
        ),
        Family(
            model_type="laguna", dense_model_type="laguna", dense_architecture="LagunaForCausalLM",
            dense_layout="mlp", expert_layout="per_expert",
            experts_attr="num_experts", expert_size_attr="moe_intermediate_size", router_prob="sigmoid",
            shared_prefix="shared_experts", gate_scale_attr="moe_routed_scaling_factor",
            all_dense=lambda n: {"mlp_layer_types": ["dense"] * n},
            notes="Laguna: sigmoid router with a score bias and optional soft-capping; its routed scaling is applied "
            "by the block and counted in the gates; every layer becomes dense.",
        ),
        Family(
            model_type="gpt_oss", dense_model_type="gpt_oss", dense_architecture="GptOssForCausalLM",
            dense_layout="one_expert", expert_layout="interleaved_biased",
            experts_attr="num_local_experts", expert_size_attr="intermediate_size",
            router_module="router", router_key="router",
            notes="No dense twin in transformers: the student is a GPT-OSS with one expert. "
            "MXFP4 expert blocks are dequantized; the student is written in bf16.",
        ),
    ]
}


# MoE families in transformers that do not fit the dense-FFN construction, and why: `convert`
# refuses them in one line and `moe2dense families` lists them.
_MULTIMODAL = ("a multimodal model: its MoE is the text model inside vision (or audio) towers; convert a text-only "
               "checkpoint of it")
UNSUPPORTED: dict[str, str] = {
    "llama4": "Llama 4 scales each expert's *input* by its router score (sigmoid of the top-k logit), so no "
    "constant can stand for the gate: a SwiGLU of a scaled input is not the scaled SwiGLU",
    "llama4_text": "Llama 4 scales each expert's *input* by its router score (sigmoid of the top-k logit), so no "
    "constant can stand for the gate: a SwiGLU of a scaled input is not the scaled SwiGLU",
    "gemma4": _MULTIMODAL,
    "gemma4_text": "Gemma 4's MoE block runs beside its dense MLP on a differently normalised input, with "
    "per-expert output scales; it has no single FFN to concatenate experts into",
    "phimoe": "PhiMoE's SparseMixer routing needs at least two experts, so a one-expert PhiMoE cannot be the "
    "student, and no dense class in transformers shares its attention and LayerNorms with biases",
    "dbrx": "DBRX's router returns only its logits and renormalises by a p-norm, and its experts are fused "
    "into one tensor per projection in a layout of its own",
    "jetmoe": "JetMoE also routes its attention heads (mixture-of-attention experts), which no dense "
    "attention can hold",
    "longcat_flash": "LongCat-Flash routes tokens to zero (identity) experts and runs two dense MLPs per layer "
    "beside a shortcut MoE",
    "nemotron_h": "Nemotron-H's experts are ungated (squared-ReLU) MLPs, not SwiGLU",
    "switch_transformers": "an encoder-decoder model whose experts are ungated (ReLU) MLPs",
    "nllb_moe": "an encoder-decoder model whose experts are ungated (ReLU) MLPs",
    "granitemoeshared": "not yet: its shared MLP sits beside the MoE block in the decoder layer, fused on disk "
    "(`shared_mlp.input_linear`), and is not yet folded into the dense FFN (granitemoe without it is supported)",
    "mistral4": "transformers builds Mistral 4 only inside its multimodal model, not as a causal LM",
    "qwen3_5_moe": "the multimodal Qwen3.5: convert its text model (model_type qwen3_5_moe_text)",
    **{name: _MULTIMODAL for name in ("qwen3_vl_moe", "qwen3_omni_moe", "ernie4_5_vl_moe", "glm4v_moe", "aria",
                                      "deepseek_ocr2", "hy_v4_vl", "minimax_m3_vl")},
}


def get_family(model_type: str | None) -> Family:
    """The family's row, completed with what transformers' checkpoint-conversion mapping says about
    its on-disk names (see `disk_layout`)."""
    if model_type in FAMILIES:
        return _completed(model_type)
    if model_type in UNSUPPORTED:
        raise UserError(f"{model_type} cannot be converted: {UNSUPPORTED[model_type]}")
    if model_type in {f.dense_model_type for f in FAMILIES.values()} | {"llama", "gemma", "gemma2", "phi3"}:
        raise UserError(f"this is a dense {model_type} model, not a Mixture-of-Experts: nothing to convert")
    raise UserError(
        f"unsupported model family {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
    )


def _unescape(pattern: str) -> str:
    return re.sub(r"\\(.)", r"\1", pattern)


@functools.cache
def disk_layout(model_type: str) -> dict[str, Any]:
    """What transformers' checkpoint-conversion mapping for `model_type` says about its MoE
    checkpoints on disk: the MoE block's on-disk name (`moe_prefix`), each expert's projection
    names (`expert_keys`), fused expert tensors' names (`fused_keys`) and other renamings
    (`disk_renames`). Only what the mapping states is returned; a row's own values come first."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    out: dict[str, Any] = {}
    per_expert: dict[str, tuple[str, ...]] = {}
    fused: dict[str, str] = {}
    renames: list[tuple[str, str]] = []
    for t in get_checkpoint_conversion_mapping(model_type) or []:
        sources = [_unescape(p) for p in getattr(t, "source_patterns", None) or ()]
        targets = [_unescape(p) for p in getattr(t, "target_patterns", None) or ()]
        if len(targets) != 1 or not sources:
            continue
        target, kind = targets[0], type(t).__name__
        which = "gate_up" if target.endswith("experts.gate_up_proj") else \
            "down" if target.endswith("experts.down_proj") else None
        if kind == "WeightConverter" and which:
            names = [re.search(r"experts\.\*\.(\w+)\.weight$", p) for p in sources]
            if all(names):
                per_expert[which] = tuple(m.group(1) for m in names)
        elif kind == "WeightRenaming" and which and len(sources) == 1:
            fused[which] = sources[0]
        elif kind == "WeightRenaming" and len(sources) == 1:
            block = re.fullmatch(r"\.?(\w+)\.", sources[0]), re.fullmatch(r"\.?(\w+)\.", target)
            if all(block):
                out["moe_prefix"] = block[0].group(1)
            else:
                renames.append((sources[0], target))
    if len(per_expert.get("gate_up", ())) == 2 and len(per_expert.get("down", ())) == 1:
        out["expert_keys"] = (*per_expert["gate_up"], per_expert["down"][0])
    if "gate_up" in fused and "down" in fused:
        # relative to the block: `block_sparse_moe.input_linear.weight` -> `input_linear.weight`
        out["fused_keys"] = tuple(name.split(".", 1)[1] if name.count(".") > 1 else name
                                  for name in (fused["gate_up"], fused["down"]))
    if renames:
        out["disk_renames"] = tuple(renames)
    return out


@functools.cache
def _completed(model_type: str) -> Family:
    row = FAMILIES[model_type]
    known = disk_layout(model_type)
    return replace(
        row,
        moe_prefix=row.moe_prefix or known.get("moe_prefix") or row.moe_module,
        expert_keys=row.expert_keys or known.get("expert_keys") or ("gate_proj", "up_proj", "down_proj"),
        fused_keys=row.fused_keys or known.get("fused_keys") or ("experts.gate_up_proj", "experts.down_proj"),
        disk_renames=row.disk_renames or known.get("disk_renames", ()),
    )


@dataclass(frozen=True)
class MoEShape:
    """The numbers of one source model that every stage needs, read once from its config."""

    num_layers: int
    hidden_size: int
    num_experts: int
    top_k: int
    expert_size: int
    shared_size: int  # 0 when the model has no shared expert
    dense_size: int  # intermediate size of the layers that are already dense
    moe_layers: tuple[int, ...]

    @property
    def dense_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in set(self.moe_layers))


MAX_LAYERS = 10_000  # no real decoder has more


def moe_shape(family: Family, config: Any) -> MoEShape:
    """Read the layer/expert geometry from a transformers config object."""
    n = int(config.num_hidden_layers)
    if not 0 < n <= MAX_LAYERS:  # a corrupt count would make every per-layer list unbounded
        raise UserError(f"the {family.model_type} config has num_hidden_layers={n}, not 1..{MAX_LAYERS}")
    why = family.refuse(config) if family.refuse else None
    if why:
        raise UserError(f"this {family.model_type} model cannot be converted: {why}")
    num_experts = getattr(config, family.experts_attr, None)
    if not num_experts:
        raise UserError(f"the {family.model_type} config describes no MoE layers: not an MoE model")
    E, top_k = _count(config, family.experts_attr), _count(config, family.top_k_attr)
    if top_k > E:
        raise UserError(f"the {family.model_type} config routes each token to {family.top_k_attr}={top_k} "
                        f"experts, but there are only {E} ({family.experts_attr}): the config is broken")
    _check_groups(family, config, E, top_k)
    moe_layers, dense_size, shared = _layer_kinds(config, family)
    if not moe_layers:
        raise UserError(f"the {family.model_type} config describes no MoE layers: not an MoE model")
    return MoEShape(
        num_layers=n,
        hidden_size=_count(config, "hidden_size"),
        num_experts=E,
        top_k=top_k,
        expert_size=_count(config, family.expert_size_attr),
        shared_size=shared,
        dense_size=dense_size,
        moe_layers=moe_layers,
    )


def _layer_kinds(config: Any, family: "Family") -> tuple[tuple[int, ...], int, int]:
    """The MoE layers as transformers builds them, the widest already-dense FFN (0 if none) and
    the width of the shared experts (0 if none).

    The model is built on the meta device (no memory, whatever its size): every family's rule for
    which layers are sparse (`mlp_only_layers`, `first_k_dense_replace`, `mlp_layer_types`,
    `moe_layer_start_index`, ...) is transformers' own, not restated here."""
    import torch

    key = (config.to_json_string(use_diff=False), family.model_type)
    if key not in _LAYER_KINDS:
        from transformers import AutoModelForCausalLM

        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
        except Exception as e:  # noqa: BLE001 - a config transformers cannot build a model from
            raise UserError(f"transformers cannot build a {config.model_type} model from this config: "
                            f"{' '.join(str(e).split())[:300]}") from None
        moe, dense, shared = [], 0, 0
        for i, layer in enumerate(getattr(model, "model", model).layers):
            block = getattr(layer, family.moe_module, None)
            if block is not None and hasattr(block, "experts"):
                moe.append(i)
                extra = getattr(block, family.shared_prefix, None) if family.shared_prefix else None
                if extra is not None:
                    shared = int(getattr(extra, family.dense_keys[0]).weight.shape[0])
            elif hasattr(getattr(layer, family.dense_prefix, None), family.dense_keys[0]):
                ffn = getattr(layer, family.dense_prefix)
                dense = max(dense, int(getattr(ffn, family.dense_keys[0]).weight.shape[0]))
        _LAYER_KINDS[key] = (tuple(moe), dense, shared)
    return _LAYER_KINDS[key]


_LAYER_KINDS: dict[tuple[str, str], tuple[tuple[int, ...], int, int]] = {}


def _count(config: Any, name: str) -> int:
    """A config value that must be a positive integer (a size, a count)."""
    value = getattr(config, name, None)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        if isinstance(value, float) and value.is_integer() and value >= 1:
            return int(value)
        raise UserError(f"{name}={value!r} in the {getattr(config, 'model_type', '')} config is not a positive "
                        f"integer: the config is broken")
    return value


def _check_groups(family: Family, config: Any, num_experts: int, top_k: int) -> None:
    """Group-limited top-k needs groups that split the experts evenly and hold the top-k: otherwise
    transformers fails mid-run, or (fewer candidates than k) silently routes to masked experts."""
    if family.group_topk == "never" or (
            family.group_topk == "by_method" and getattr(config, "topk_method", None) != "group_limited_greedy"):
        return
    groups, keep = getattr(config, "n_group", None), getattr(config, "topk_group", None)
    where = f"the {family.model_type} config"
    if not isinstance(groups, int) or not isinstance(keep, int) or groups < 1 or keep < 1:
        raise UserError(f"{where} uses group-limited routing but n_group={groups!r}, topk_group={keep!r} "
                        f"are not positive integers: the config is broken")
    if num_experts % groups:
        raise UserError(f"{where} splits {num_experts} experts into n_group={groups} groups, which does not "
                        f"divide them: the config is broken")
    if keep > groups:
        raise UserError(f"{where} keeps topk_group={keep} of n_group={groups} expert groups: the config is broken")
    if family.group_topk == "always" and num_experts // groups < 2:
        raise UserError(f"{where} has groups of {num_experts // groups} expert; group scores need 2: "
                        f"the config is broken")
    if top_k > keep * (num_experts // groups):
        raise UserError(f"{where} routes to num_experts_per_tok={top_k} experts among the "
                        f"{keep * (num_experts // groups)} of its topk_group={keep} groups: the config is broken")


def dense_config_dict(
    family: Family, config_dict: dict[str, Any], shape: MoEShape, routed_size: int
) -> dict[str, Any]:
    """Derive the student's config.json from the teacher's.

    `routed_size` is the width of the concatenated routed part (k groups x expert size). The
    student's FFN width is the widest of: routed + shared, and the teacher's own dense layers;
    narrower layers are padded with zero neurons, which contribute exactly nothing.
    """
    d = {k: v for k, v in config_dict.items() if k not in ("quantization_config", "auto_map")}
    d["model_type"] = family.dense_model_type
    d["architectures"] = [family.dense_architecture]
    if family.dense_layout == "one_expert":
        d[family.experts_attr] = 1
        d[family.top_k_attr] = 1
        d[family.expert_size_attr] = routed_size
        return d
    for k in family.moe_config_keys:
        d.pop(k, None)
    d["intermediate_size"] = dense_width(shape, routed_size)
    if family.all_dense is not None:
        d.update(family.all_dense(shape.num_layers))
    return d


def dense_width(shape: MoEShape, routed_size: int) -> int:
    return max(routed_size + shape.shared_size, shape.dense_size)


def supported_families_table() -> str:
    """A Markdown table of the families, for `--help` and the docs."""
    rows = ["| family | student | routed experts | notes |", "|---|---|---|---|"]
    for f in FAMILIES.values():
        student = f.dense_architecture + (" (1 expert)" if f.dense_layout == "one_expert" else "")
        rows.append(f"| {f.model_type} | {student} | `{f.experts_attr}` | {f.notes} |")
    if UNSUPPORTED:
        rows += ["", "Not supported (`convert` refuses them, saying why):", "", "| family | why |", "|---|---|"]
        rows += [f"| {name} | {why} |" for name, why in sorted(UNSUPPORTED.items())]
    return "\n".join(rows)
