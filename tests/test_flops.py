"""Model FLOPs (raymix/flops.py): the counts of a model, and the training
step's counts of the tokens, completion tokens and attention pairs they
are applied to. Integer arithmetic throughout: exact comparisons."""

from __future__ import annotations

import pytest

from raymix.flops import ModelFlops, causal_pairs

torch = pytest.importorskip("torch")


def _llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))


@pytest.mark.parametrize("tied", [True, False])
def test_the_input_embedding_is_a_lookup_and_the_output_layer_counted_apart(tied: bool) -> None:
    model = _llama(tied)
    flops = ModelFlops.of(model)
    total = sum(p.numel() for p in model.parameters())  # a tied matrix once
    assert flops.parameters == total and flops.output == 100 * 32 and flops.layers == 2
    assert flops.body == total - 100 * 32 * (1 if tied else 2)  # untied: the lookup table is not a product
    assert flops.attention_width == 32  # 4 heads of 8
    # 6 per body parameter and token, 6 per output parameter and scored token, 12 x layers x width per pair.
    assert flops.required(10, 4, 55) == 6 * flops.body * 10 + 6 * 3200 * 4 + 12 * 2 * 32 * 55
    assert flops.palm_per_token(16) == 6 * total + 12 * 2 * 32 * 16


def test_causal_pairs_within_examples() -> None:
    assert causal_pairs([1, 2, 3]) == 1 + 3 + 6
    assert causal_pairs([]) == 0
    assert causal_pairs([2048]) == 2048 * 2049 // 2


def test_a_model_without_the_usual_fields_is_counted_without_failing() -> None:
    """No attention fields, no embedding accessors: the parameters are all
    counted as applied at every position, with no attention term."""

    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {})()
            self.proj = torch.nn.Linear(4, 3)

    flops = ModelFlops.of(Bare())
    assert flops == ModelFlops(body=15, output=0, parameters=15, layers=0, attention_width=0)
    assert flops.required(2, 1, 3) == 6 * 15 * 2
