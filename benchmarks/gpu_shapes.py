"""The shapes ``gpu_check.py`` runs at: real ones on a GPU, toy ones for ``--tiny`` on the CPU."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    """Shapes of one run: the real ones on a GPU, toy ones for ``--tiny``."""

    q_heads: int
    kv_heads: int
    head_dim: int
    contexts: tuple[int, ...]
    batches: tuple[int, ...]
    copy_numel: int
    e2e_config: dict
    e2e_context: int
    e2e_new_tokens: int


GPU = Sizes(32, 8, 128, (4096, 32768, 131072), (1, 8), 2 ** 28,
            dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                 rope_theta=500000.0, tie_word_embeddings=True), 32768, 64)
TINY = Sizes(4, 2, 64, (256,), (1, 2), 2 ** 16,
             dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=4096), 300, 4)
