"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
import tempfile

import pytest

# torch.compile's C++ kernels (train.compile on CPU) are cached with a
# precompiled header that does not record ATEN_CPU_CAPABILITY: a cache
# filled under one setting breaks the compile under another ('at::vec' has
# not been declared). One cache per setting, as the suite is run under
# several (default, avx2) to check its tolerances.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"raymix-tests-inductor-{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one torch thread (spinning threads only cost time on a
    shared 2-core machine). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A local Ray for one test module, sized for a 2-core machine; the
    pool cache is a temporary folder unless RAYMIX_CACHE is set."""
    import os

    import ray

    os.environ.setdefault("RAYMIX_CACHE", str(tmp_path_factory.mktemp("cache")))
    ray.init(num_cpus=2, object_store_memory=200_000_000, include_dashboard=False)
    yield
    ray.shutdown()


def tiny_llama(vocab_size: int):
    """A float64 Llama with one block of width 8 and tied embeddings, seeded:
    small enough for dense reference solves and exact fine-tuning."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=12, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).double()


def prepare_pool(tmp_path_factory, overrides: list[str]):
    """(pool, tokenizer dir, initial model dir) of a config, prepared once by
    the real data path (Ray Data tokenises: a local Ray for the duration),
    for tests that run the training loop in this process."""
    import os

    import ray

    from raymix.config import load_config
    from raymix.driver.setup import prepare_model_and_data

    os.environ.setdefault("RAYMIX_CACHE", str(tmp_path_factory.mktemp("cache")))
    out = tmp_path_factory.mktemp("prepared")
    ray.init(num_cpus=2, object_store_memory=200_000_000, include_dashboard=False)
    try:
        _, tok_dir, pool, init_dir = prepare_model_and_data(load_config(None, overrides), out)
    finally:
        ray.shutdown()
    return pool, tok_dir, init_dir


@pytest.fixture(scope="module")
def prepared(request, tmp_path_factory):
    """:func:`prepare_pool` of the requesting module's ``SMALL`` overrides,
    once per module (the in-process loop tests)."""
    return prepare_pool(tmp_path_factory, request.module.SMALL)



TINY_IN_PROCESS = [
    "data.sources=[{kind: synthetic, scale: 0.02}]",
    "data.max_test=4",
    "model.vocab_size=512",
    "train.micro_batch_size=16",
    "train.sync_every=2",
    "train.log_every=2",
    "eval.max_test_examples=4",
    "eval.max_new_tokens=6",
    "eval.curve_points=2",
    "eval.suite=null",
    "runtime.num_cpus=2",
    "runtime.num_workers=0",
    "runtime.object_store_memory=200000000",
    "budget.tokens=6000",
]
"""A whole run on a tiny pool in this process (about 6k tokens), for the
multi-round drivers' end-to-end tests; each adds its policy's options."""


def process_gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped counts as gone): the
    orphan checks of the kill tests wait on this."""
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True
