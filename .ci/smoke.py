"""CI's first minute: does kvpipe still import and generate on the transformers and torch this machine installed?

Run from the project root, as users do (the current directory first on ``sys.path``). A breaking transformers
release shows here, with the versions, before the long test suite starts.
"""
import sys

import torch
import transformers

print(f"smoke: python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}",
      flush=True)

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import kvpipe  # noqa: E402

config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, attn_implementation="sdpa",
                     pad_token_id=0, eos_token_id=None, bos_token_id=1)
torch.manual_seed(0)
model = LlamaForCausalLM(config).eval()
ids = torch.randint(2, 255, (1, 200))
try:
    for name in ("default", "int4"):
        handle = kvpipe.build(name).attach(model)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        ratio = handle.stats()["compression_ratio"]
        handle.detach()
        assert out.shape == (1, 204), out.shape
        print(f"smoke: {name}: generate() ok, {ratio:.2f}x smaller cache", flush=True)
except Exception as error:
    print(f"\nsmoke FAILED on transformers {transformers.__version__} / torch {torch.__version__}: "
          f"{type(error).__name__}: {error}\nA new release may have broken kvpipe: fix main first.", file=sys.stderr)
    raise
