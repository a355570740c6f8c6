"""Real architectures with random weights, so everything runs with nothing downloaded.

`dummy:tiny` is a few-million-parameter Llama for CPU tests; `dummy:llama-3-8b` has the exact
shapes of Llama-3-8B (the reference workload in docs/benchmarks.md). Throughput depends on shapes,
not on weight values. Both get a small byte-level BPE tokenizer trained on the spot (its ids are
valid in either vocabulary) with a ChatML-style chat template, so the chat-template path is real.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

from tubesum.settings import DEFAULT_PROMPT

DUMMY_PREFIX = "dummy:"
TINY_VOCAB = 512  # small enough to train in well under a second

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>"]

# Text to learn merges from: enough English for a usable BPE, no download.
_CORPUS = [
    DEFAULT_PROMPT,
    "Octopuses have three hearts and blue blood. Some birds migrate thousands of kilometres "
    "every year, guided by the stars, the sun and the magnetic field of the earth.",
    "Trees talk to each other through fungi in the soil. Bees dance to tell their sisters "
    "where the flowers are. The blue whale is the largest animal that has ever lived.",
    "In this video we learn how plants turn sunlight into sugar, why leaves change colour in "
    "autumn, and how a tiny seed can grow into a giant redwood over hundreds of years.",
    "Hello, welcome back. Today we talk about the ocean, the forest, the desert and the ice. "
    "Summary: the main takeaways are simple, friendly and full of curious facts.",
]

ARCHS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
        rope_theta=10000.0, initializer_range=0.2, tie_word_embeddings=False,
    ),
    # One narrow layer: cheap enough on CPU for a test job with a 200,000-word transcript.
    "micro": dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rope_theta=10000.0, initializer_range=0.2, tie_word_embeddings=False,
    ),
    "llama-3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "llama-3-1b": dict(  # Llama-3.2-1B shapes: a quick GPU smoke model
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    ),
}


def is_dummy(spec: str) -> bool:
    return spec.startswith(DUMMY_PREFIX)


def train_tokenizer(vocab_size: int = TINY_VOCAB) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def dummy_config(arch: str) -> LlamaConfig:
    if arch not in ARCHS:
        raise ValueError(f"unknown dummy architecture {arch!r}; choose from {', '.join(ARCHS)}")
    return LlamaConfig(**ARCHS[arch])


def build_dummy(spec: str, *, device: str | torch.device, dtype: torch.dtype, seed: int = 0):
    """(model, tokenizer) of `dummy:<arch>`, random weights built directly on `device`."""
    arch = spec[len(DUMMY_PREFIX):] if is_dummy(spec) else spec
    config = dummy_config(arch)
    tokenizer = train_tokenizer()
    config.bos_token_id = tokenizer.convert_tokens_to_ids("<s>")
    config.eos_token_id = [tokenizer.convert_tokens_to_ids("</s>"), tokenizer.eos_token_id]
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id, do_sample=False,
    )
    return model.eval(), tokenizer


def save_dummy(spec: str, path: str | Path) -> Path:
    """Write `dummy:<arch>` with save_pretrained, so it loads by path like any local model."""
    model, tokenizer = build_dummy(spec, device="cpu", dtype=torch.float32)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
