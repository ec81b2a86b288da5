import copy
import os

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_tiny_llama(seed: int = 0, hidden: int = 256, layers: int = 2, vocab: int = 512):
    """A random Llama small enough for exact-maths tests (hidden 256, 2 layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).float().eval()
    return model


@pytest.fixture(scope="session")
def tiny_llama_base():
    return make_tiny_llama()


@pytest.fixture
def tiny_llama(tiny_llama_base):
    return copy.deepcopy(tiny_llama_base)


@pytest.fixture(scope="session")
def embedded_model_dir():
    """The real shipped model (SmolLM2-135M-Instruct), converted once into the cache."""
    from qdpo_ray.models import resolve_model_path

    return resolve_model_path("smollm2-135m")
