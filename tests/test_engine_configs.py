"""The fast runner against transformers' generate() on tiny random models of the configurations
that only real checkpoints have: Llama-3.1's `llama3` RoPE scaling, several end ids (a generation
config's eos list), Qwen2's q/k/v biases, tied input and output embeddings. CPU, fp32, greedy."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config

from tubesum.workers.gpu.engine import stop_token_ids
from tubesum.workers.gpu.runner import LlamaRunner

VOCAB = 256
NEW_TOKENS = 24
# Shapes small enough for seconds on a CPU; large init so random weights do not emit one token.
SHAPES = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    initializer_range=0.2,
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)


def build(config) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def prompts(n: int = 4, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, VOCAB) for _ in range(rng.randrange(5, 90))] for _ in range(n)]


def hf_generate(model, prompt: list[int], *, eos: list[int] | None, new: int = NEW_TOKENS) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def fast_generate(model, batch: list[list[int]], *, stop: set[int], new: int = NEW_TOKENS) -> list[list[int]]:
    runner = LlamaRunner(model)
    rows, _ = runner.generate(batch, max_new_tokens=new, stop_ids=stop)
    return rows


def assert_same_as_generate(model, *, stop: set[int] | None = None) -> list[list[int]]:
    batch = prompts()
    # HF generate() fuses the projections' views the runner shares: compare before building it.
    expected = [hf_generate(model, p, eos=sorted(stop) if stop else None) for p in batch]
    got = fast_generate(model, batch, stop=stop or set())
    assert got == expected
    return got


def test_llama3_rope_scaling():
    config = LlamaConfig(**SHAPES, rope_scaling=LLAMA3_ROPE)
    model = build(config)
    assert model.config.rope_parameters["rope_type"] == "llama3"
    assert_same_as_generate(model)
    # The scaling matters here: the same weights without it generate other tokens.
    plain = build(LlamaConfig(**SHAPES, rope_theta=500000.0))
    assert fast_generate(plain, prompts(), stop=set()) != fast_generate(model, prompts(), stop=set())


def test_several_end_ids_end_rows_at_their_own_token():
    model = build(LlamaConfig(**SHAPES, eos_token_id=None))
    free = fast_generate(model, prompts(), stop=set())
    # Two end ids the model really emits, in different rows at different steps.
    ends = {free[0][5], free[1][9]}
    model.generation_config = GenerationConfig(eos_token_id=sorted(ends))
    tokenizer = type("Tok", (), {"eos_token_id": None})()
    stop = stop_token_ids(model, tokenizer)
    assert stop == ends
    rows = assert_same_as_generate(model, stop=stop)
    lengths = {len(r) for r in rows if r[-1] in ends}
    assert len(lengths) >= 2  # rows ended at different steps


def test_qwen2_qkv_biases():
    model = build(Qwen2Config(**SHAPES))
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():  # from_config zeroes biases: make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    assert_same_as_generate(model)


@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_embeddings(tied):
    model = build(LlamaConfig(**SHAPES, tie_word_embeddings=tied))
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is tied
    assert_same_as_generate(model)
