"""Real architectures with random weights, so everything runs with nothing downloaded.

`dummy:tiny` is a few-million-parameter Llama for CPU tests; `dummy:llama-3-8b` has the exact
shapes of Llama-3-8B (the reference workload in docs/benchmarks.md); `dummy:llama-2-70b`,
`dummy:llama-3-70b` and `dummy:mixtral-8x7b` are the big models of the multi-GPU rows, built one
tensor-parallel shard per GPU (workers/gpu/tp.py), never whole on one card; `dummy:tiny-mixtral`
is their MoE twin for CPU tests. Throughput depends on shapes,
not on weight values. Both get a small byte-level BPE tokenizer trained on the spot (its ids are
valid in either vocabulary) with a ChatML-style chat template, so the chat-template path is real.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    MixtralConfig,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
)

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
        vocab_size=TINY_VOCAB,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        initializer_range=0.2,
        tie_word_embeddings=False,
    ),
    # One narrow layer: cheap enough on CPU for a test job with a 200,000-word transcript.
    "micro": dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        initializer_range=0.2,
        tie_word_embeddings=False,
    ),
    "llama-3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "llama-3-1b": dict(  # Llama-3.2-1B shapes: a quick GPU smoke model
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    "llama-2-70b": dict(  # the tutorial's model: 141 GB in bf16, so two cards at least
        vocab_size=32000,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "llama-3-70b": dict(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "mixtral-8x7b": dict(  # 8 experts, top-2 routing: 47B parameters, 13B active per token
        model_type="mixtral",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    # The MoE math on CPU: tensor-parallel and router tests against transformers' Mixtral.
    "tiny-mixtral": dict(
        model_type="mixtral",
        vocab_size=TINY_VOCAB,
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        initializer_range=0.2,
        tie_word_embeddings=False,
    ),
}
# Share of the weights each GPU may take beyond an even split when device_map balances layers.
DEVICE_MAP_BALANCE = 1.05
_CONFIG_CLASSES: dict[str, type[PreTrainedConfig]] = {"llama": LlamaConfig, "mixtral": MixtralConfig}


def is_dummy(spec: str) -> bool:
    return spec.startswith(DUMMY_PREFIX)


def train_tokenizer(vocab_size: int = TINY_VOCAB) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def dummy_config(arch: str) -> PreTrainedConfig:
    if arch not in ARCHS:
        raise ValueError(f"unknown dummy architecture {arch!r}; choose from {', '.join(ARCHS)}")
    fields = dict(ARCHS[arch])
    return _CONFIG_CLASSES[fields.pop("model_type", "llama")](**fields)


def dummy_arch(spec: str) -> str:
    return spec[len(DUMMY_PREFIX) :] if is_dummy(spec) else spec


def dummy_config_with_tokens(spec: str) -> tuple[PreTrainedConfig, PreTrainedTokenizerFast]:
    """The config of `dummy:<arch>` with the special-token ids of its freshly trained tokenizer."""
    config = dummy_config(dummy_arch(spec))
    tokenizer = train_tokenizer()
    config.bos_token_id = tokenizer.convert_tokens_to_ids("<s>")
    config.eos_token_id = [tokenizer.convert_tokens_to_ids("</s>"), tokenizer.eos_token_id]
    config.pad_token_id = tokenizer.pad_token_id
    return config, tokenizer


def dummy_generation_config(config: PreTrainedConfig) -> GenerationConfig:
    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
    )


def build_dummy(spec: str, *, device: str | torch.device, dtype: torch.dtype, seed: int = 0):
    """(model, tokenizer) of `dummy:<arch>`, random weights built directly on `device`."""
    config, tokenizer = dummy_config_with_tokens(spec)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = dummy_generation_config(config)
    return model.eval(), tokenizer


def build_dummy_fp8(spec: str, *, device: str | torch.device, dtype: torch.dtype, seed: int = 0):
    """(model, tokenizer) of `dummy:<arch>` with every decoder projection drawn directly in FP8
    (workers/gpu/fp8_load.py): the bf16 model is never materialised, so 70B fits one card."""
    from tubesum.workers.gpu.fp8_load import random_fp8_model

    config, tokenizer = dummy_config_with_tokens(spec)
    model = random_fp8_model(config, device=torch.device(device), dtype=dtype, seed=seed)
    model.generation_config = dummy_generation_config(config)
    return model, tokenizer


def build_dummy_device_map(spec: str, *, gpus: int, dtype: torch.dtype, seed: int = 0):
    """(model, tokenizer) of `dummy:<arch>` spread over `gpus` GPUs by accelerate's device_map,
    layer by layer and balanced (the tutorial's multi-GPU setup, the baseline of tensor
    parallelism). Built on the meta device and materialised on each layer's own GPU."""
    from accelerate import dispatch_model, infer_auto_device_map

    config, tokenizer = dummy_config_with_tokens(spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    weight_bytes = sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8
    per_gpu = int(weight_bytes / gpus * DEVICE_MAP_BALANCE) + 2**30
    layer_class = type(model.model.layers[0]).__name__
    device_map = infer_auto_device_map(
        model, max_memory={i: per_gpu for i in range(gpus)}, no_split_module_classes=[layer_class], dtype=dtype
    )
    for name, dev in device_map.items():
        module = model.get_submodule(name) if name else model
        module.to_empty(device=torch.device("cuda", dev) if isinstance(dev, int) else dev)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, config.initializer_range)
    rotary_device = next(model.model.layers[0].parameters()).device
    with torch.device(rotary_device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model = dispatch_model(model, device_map=device_map)
    model.generation_config = dummy_generation_config(config)
    return model.eval(), tokenizer


def save_dummy(spec: str, path: str | Path) -> Path:
    """Write `dummy:<arch>` with save_pretrained, so it loads by path like any local model."""
    model, tokenizer = build_dummy(spec, device="cpu", dtype=torch.float32)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
