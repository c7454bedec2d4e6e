"""One attached model serving several threads, each with its own cache (what a server does): every forward's state
is the calling thread's, so concurrent forwards equal sequential ones."""
from __future__ import annotations

import threading

import pytest
import torch

from kvpipe.models import cache_arg

from conftest import fresh_seed, shipped_pipeline, tiny_model

STEPS = 12


def decode(model, handle, prompt: torch.Tensor, barrier: threading.Barrier | None = None) -> torch.Tensor:
    """Logits ``[STEPS, vocab]`` of a prefill then ``STEPS - 1`` greedy steps on a fresh cache of ``handle``."""
    cache, ids, logits = handle.cache(), prompt, []
    with torch.inference_mode():
        for _ in range(STEPS):
            if barrier is not None:
                barrier.wait()              # both threads inside a forward as often as possible
            out = model(ids, **cache_arg(model, cache)).logits[:, -1]
            logits.append(out[0])
            ids = out.argmax(-1, keepdim=True)
    return torch.stack(logits)


@pytest.mark.parametrize("name", ["decode-budget", "value-aware-int4"])
def test_two_threads_with_their_own_caches_match_one_thread(tmp_path, name):
    model = tiny_model()
    generator = torch.Generator().manual_seed(fresh_seed())
    prompts = [torch.randint(2, 250, (1, 300), generator=generator) for _ in range(2)]
    with shipped_pipeline(name, tmp_path).attach(model) as handle:
        alone = [decode(model, handle, prompt) for prompt in prompts]
        barrier, results, errors = threading.Barrier(2, timeout=60), [None, None], []

        def work(index):
            try:
                results[index] = decode(model, handle, prompts[index], barrier)
            except BaseException as err:          # noqa: BLE001 - reported below
                errors.append(err)
                barrier.abort()

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert not errors, errors
    for together, apart in zip(results, alone):
        torch.testing.assert_close(together, apart, rtol=0, atol=0)
