"""Tiny random models of the families whose layers are not all full attention, for the tests and the docs' table.

Each factory takes the sliding window (``None``: the family's real one) and returns an eval-mode model: 4 query
heads, 2 KV heads, head_dim 16, vocabulary 256, weights drawn wide (``initializer_range=0.3``) so attention is
peaked, as ``conftest.tiny_model``.
"""
from __future__ import annotations

import torch

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=8192, initializer_range=0.3, pad_token_id=0, eos_token_id=None,
              bos_token_id=1)


def gemma2(window, attn="eager"):
    from transformers import Gemma2Config, Gemma2ForCausalLM  # alternating sliding and full
    return Gemma2ForCausalLM(Gemma2Config(**COMMON, num_hidden_layers=4, sliding_window=window or 4096,
                                          attn_implementation=attn))


def gemma3(window, attn="sdpa"):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig  # five sliding layers to one full
    return Gemma3ForCausalLM(Gemma3TextConfig(**COMMON, num_hidden_layers=6, sliding_window=window or 1024,
                                              attn_implementation=attn))


def gpt_oss(window, attn="eager"):
    from transformers import GptOssConfig, GptOssForCausalLM  # alternating, with attention sinks
    settings = COMMON | dict(intermediate_size=64)
    return GptOssForCausalLM(GptOssConfig(**settings, num_hidden_layers=4, sliding_window=window or 128,
                                          num_local_experts=4, num_experts_per_tok=2, attn_implementation=attn))


def mistral(window, attn="sdpa"):
    from transformers import MistralConfig, MistralForCausalLM  # every layer sliding
    return MistralForCausalLM(MistralConfig(**COMMON, num_hidden_layers=2, sliding_window=window or 4096,
                                            attn_implementation=attn))


def qwen2(window, attn="sdpa"):
    from transformers import Qwen2Config, Qwen2ForCausalLM  # full below max_window_layers, sliding above
    return Qwen2ForCausalLM(Qwen2Config(**COMMON, num_hidden_layers=4, use_sliding_window=True,
                                        sliding_window=window or 4096, max_window_layers=2,
                                        attn_implementation=attn))


def qwen3_next(window=None, attn="sdpa"):
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM  # three linear-attention layers to one full
    return Qwen3NextForCausalLM(Qwen3NextConfig(
        **COMMON, num_hidden_layers=4, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, attn_implementation=attn))


def deepseek_v3():
    """Multi-head latent attention (MLA): refused."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM(DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
        n_group=1, topk_group=1, attn_implementation="sdpa")).eval()


# transformers class name -> factory
FAMILIES = {"Gemma2ForCausalLM": gemma2, "Gemma3ForCausalLM": gemma3, "GptOssForCausalLM": gpt_oss,
            "MistralForCausalLM": mistral, "Qwen2ForCausalLM": qwen2, "Qwen3NextForCausalLM": qwen3_next}
WINDOWED = ["Gemma2ForCausalLM", "Gemma3ForCausalLM", "GptOssForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"]


def hybrid_model(name: str, window: int | None = None, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[name](window, **kwargs).eval()
