"""Shared fixtures: tiny random-weight models (fast) and the real SmolLM2, loaded once per session."""
from __future__ import annotations

import os

import pytest
import torch

# Triton reads this when a kernel is decorated, so it must be set before any kernel module is imported:
# without a GPU the kernels run in Triton's interpreter, against their torch references.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; the device trap and the interpreter tests cover CPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def tiny_model(kind: str = "llama", attn: str = "sdpa", seed: int = 0, **overrides):
    """A 2-layer random model: 4 query heads, 2 KV heads, head_dim 16, no EOS (generation never stops early).

    Weights are drawn wider than the usual 0.02 so attention is peaked: with near-uniform attention every
    scorer ties and the tests would prove nothing."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "qwen3": (Qwen3Config, Qwen3ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}
    config_cls, model_cls = classes[kind]
    settings = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                    attn_implementation=attn, initializer_range=0.3, pad_token_id=0, eos_token_id=None,
                    bos_token_id=1)
    config = config_cls(**(settings | overrides))
    torch.manual_seed(seed)
    return model_cls(config).eval()


@pytest.fixture
def tiny():
    return tiny_model()


def tiny_gates_file(directory, shared: bool = True, seed: int = 0,
                    shape: tuple[int, int, int] = (2, 2, 16)) -> str:
    """Untrained retention gates of ``shape`` (layers, KV heads, head_dim; default: ``tiny_model()``'s), saved as a
    gate file. A low bias and wide weights make ``log β`` differ between tokens, so eviction has a choice."""
    from kvpipe.core.gates import RetentionGates

    torch.manual_seed(seed)
    gates = RetentionGates(*shape, hidden=8, bias_init=1.0, shared=shared)
    for weight in (p for p in gates.parameters() if p.dim() > 1):
        torch.nn.init.normal_(weight, std=0.5)
    layers, heads, dim = shape
    path = f"{directory}/gates-{layers}x{heads}x{dim}-{'shared' if shared else 'unshared'}-{seed}.safetensors"
    gates.save(path, {"model": "tiny llama", "note": "untrained, for tests"})
    return path


def shipped_pipeline(name: str, directory, gate_shape: tuple[int, int, int] = (2, 2, 16), **spec_overrides):
    """A shipped pipeline for a test model: its SmolLM2 gates (if any) swapped for untrained ones of
    ``gate_shape``, a reconstruction prompt (text, which a test model has no tokenizer for) dropped, so the
    context is read again bare, and top-level spec keys (``backend=...``) overridden."""
    import kvpipe

    spec = kvpipe.build(name).spec.model_dump(mode="python", exclude_none=True) | spec_overrides
    for stage in spec["stages"]:
        if isinstance(stage, dict) and stage.get("stage") == "retention_gates":
            stage["params"]["gates"] = tiny_gates_file(directory, shape=gate_shape)
        if isinstance(stage, dict) and stage.get("stage") == "reconstruction":
            stage["params"]["prompt"] = ""
    return kvpipe.build(spec)


def refuses_rotated_codes(pipeline, model) -> bool:
    """A pipeline storing rotated codes on the triton backend is refused at attach (the fused kernels do not read
    them yet); checked here, so tests over every shipped pipeline and backend say so rather than skip."""
    storage = pipeline.storage_stage
    if pipeline.spec.backend != "triton" or storage is None or storage.params.rotate == "none":
        return False
    from kvpipe import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="rotated codes.*backend: torch"):
        pipeline.attach(model)
    return True


def left_padded_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids [2, 300]`` and their attention mask, the second row left-padded by 17: rows (and, after compression,
    heads) of different lengths, so the per-row paths run."""
    ids = torch.randint(2, 250, (2, 300), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :17] = 0
    return ids, mask


@pytest.fixture(scope="session")
def smollm():
    """``(model, tokenizer)`` of the embedded SmolLM2-135M-Instruct."""
    from kvpipe.models import load

    return load("smollm2-135m")


def kept_bytes_ratio(stats: dict) -> float:
    """The full cache's bytes over what the kept tokens cost: ``compression_ratio`` with the static decode tails'
    empty slots (room reserved for the decode steps to come, ``tail_reserve_bytes``) set aside. In the toy contexts
    of tests (a few hundred tokens) that reserve, 32 to 128 slots a head, is a large share; in real ones it is not."""
    return stats["kv_bytes_full"] / (stats["kv_bytes"] - stats["tail_reserve_bytes"])


def tail_bytes(layer) -> int:
    """Bytes of a layer's tail in an fp32 model: its tokens, or a static tail's whole buffers."""
    tail = layer.static_tail.keys if layer.static_tail is not None else layer.keys
    return tail.numel() * 8


def fresh_seed() -> int:
    """A new random seed, printed: pytest shows a failing test's output, so the failure can be replayed."""
    seed = int(torch.seed() % 2**31)
    print(f"seed {seed}")
    return seed


@pytest.fixture
def random_ids():
    def make(batch: int, length: int, vocab: int = 256, seed: int | None = None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed if seed is not None else fresh_seed())
        return torch.randint(2, vocab - 1, (batch, length), generator=generator)
    return make
