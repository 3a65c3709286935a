"""The HF config dicts of the tiny built-in models (``posttrain.models``), importable with no
dependency beyond the standard library: the GPU smoke script builds them on a bare GPU box."""

from __future__ import annotations

from typing import Any


def tiny_llama_config() -> dict[str, Any]:
    """The ``tiny-llama`` built-in: 3.2M parameters with SmolLM2's 49152-token vocabulary."""
    return dict(
        # head_dim 32: the smallest vLLM-CPU has an attention kernel for
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=8192,
        rope_theta=10000.0, tie_word_embeddings=True,
    )


def tiny_nemotron_h_config() -> dict[str, Any]:
    """The ``tiny-nemotron-h`` built-in."""
    # The hybrid Mamba2 / attention / MoE stack of Nemotron 3 Nano at toy size:
    # M = Mamba2, * = attention, E = MoE (8 routed experts, 2 active, 1 shared).
    return dict(
        model_type="nemotron_h", hidden_size=64, hybrid_override_pattern="M*EME*",
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, mamba_num_heads=8,
        mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=128, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=64,
        moe_shared_expert_intermediate_size=128, intermediate_size=128,
        max_position_embeddings=8192, tie_word_embeddings=True,
    )
