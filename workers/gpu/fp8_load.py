"""FP8 models without a bf16 copy in memory: ready FP8 checkpoints, and random FP8 weights.

A 70B model is 141 GB in bf16 and 70 GB in FP8: on one 141 GB card it fits only if the bf16
matrices never exist. So the model is built on the meta device, only the small parameters
(embedding, norms, lm_head, biases) are materialised on the card, and every decoder projection
gets its FP8 weight directly (`fp8.attach`): read from the checkpoint, or drawn one matrix at a
time and quantised.

Checkpoint formats (config.json `quantization_config`), each mapped to one FP8 matrix with one
scale per output channel (the runner's form, workers/gpu/fp8.py):

* `compressed-tensors` (RedHatAI/neuralmagic "-FP8" and "-FP8-dynamic" releases): `weight`
  float8_e4m3fn, `weight_scale` per tensor ([1] / scalar) or per channel ([N, 1]);
* `fbgemm_fp8` (meta-llama's Llama-3.1-405B-Instruct-FP8): `weight_scale` [N, 1] and an
  `activation_scale_ub` in the config;
* `modelopt` with `quant_algo` FP8 (nvidia's Llama-3.1-8B/70B-Instruct-FP8): `weight_scale`
  per tensor;
* `fp8` (transformers' own, DeepSeek/Qwen style): `weight_scale_inv`, per block
  (`weight_block_size`) or per tensor.

Static activation scales (`input_scale`) and KV-cache scales (`k_scale`, `v_scale`) are read past:
activations are always quantised per token on the fly (at least as accurate as one static
per-tensor scale), and the KV cache stays in the model's dtype.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from tubesum.errors import ModelLoadError
from tubesum.workers.gpu import fp8

log = logging.getLogger(__name__)

# quantization_config's quant_method values this loader reads.
CHECKPOINT_FORMATS = ("compressed-tensors", "fbgemm_fp8", "modelopt", "fp8")
# Checkpoint tensors that are read past (see the module doc).
IGNORED_SUFFIXES = (".input_scale", ".k_scale", ".v_scale", ".output_scale", ".weight_zero_point")
SCALE_SUFFIXES = (".weight_scale", ".weight_scale_inv")


def quantization_config(path: str | Path) -> dict | None:
    """The `quantization_config` of a local model directory's config.json, if any."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("quantization_config")


def checkpoint_format(qcfg: dict | None) -> str | None:
    """Which FP8 format a quantization_config describes; None for no quantisation. Raises
    ModelLoadError for a quantisation this loader cannot run (int4, nvfp4, ...)."""
    if not qcfg:
        return None
    method = str(qcfg.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        for group in qcfg.get("config_groups", {}).values():
            w = group.get("weights") or {}
            if w.get("type") != "float" or int(w.get("num_bits", 0)) != 8:
                raise ModelLoadError(f"compressed-tensors weights {w.get('type')}{w.get('num_bits')} are not FP8")
            if w.get("strategy") not in ("tensor", "channel"):
                raise ModelLoadError(f"compressed-tensors FP8 strategy {w.get('strategy')!r} is not supported")
        return method
    if method == "modelopt":
        algo = str(qcfg.get("quant_algo", "")).upper()
        if algo != "FP8":
            raise ModelLoadError(f"modelopt quant_algo {algo!r} is not FP8")
        return method
    if method in ("fbgemm_fp8", "fp8"):
        return method
    raise ModelLoadError(f"quantization {method!r} is not supported (FP8 formats: {', '.join(CHECKPOINT_FORMATS)})")


def _materialise(module: torch.nn.Module, name: str, device: torch.device, dtype: torch.dtype) -> None:
    param = module._parameters[name]
    assert param is not None
    module._parameters[name] = torch.nn.Parameter(
        torch.empty(param.shape, dtype=dtype, device=device), requires_grad=False
    )


def empty_model(config, *, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The model with its decoder projections left on the meta device (each gets an FP8 weight
    later) and every other parameter uninitialised on `device`; rotary tables computed."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    projections = {id(m) for _n, m in fp8.decoder_linears(model)}
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is None:
                continue
            big = (id(module) in projections and pname == "weight") or pname in ("gate_up_proj", "down_proj")
            if not big:
                _materialise(module, pname, device, dtype)
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def random_fp8_model(config, *, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """Random N(0, initializer_range) weights (ones for norms) with every decoder projection in
    FP8, drawn one matrix at a time: the bf16 model never exists (70B on one card)."""
    model = empty_model(config, device=device, dtype=dtype)
    std = getattr(config, "initializer_range", 0.02)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.device.type == "meta":
                continue
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
        for _name, module in fp8.decoder_linears(model):
            w = torch.empty(module.weight.shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)
            fp8.attach(module, fp8.quantize_weight(w))
            module.weight = torch.nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False)
        for module in model.modules():
            if hasattr(module, "gate_up_proj"):  # Mixtral experts, one tensor at a time
                for attr, target in (("gate_up_proj", "fp8_gate_up"), ("down_proj", "fp8_down")):
                    shape = getattr(module, attr).shape
                    w = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)
                    setattr(module, target, fp8.quantize_weight(w))
                    setattr(
                        module,
                        attr,
                        torch.nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False),
                    )
                    del w
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def _scale_name(names: set[str], weight: str) -> str | None:
    base = weight.removesuffix(".weight")
    for suffix in SCALE_SUFFIXES:
        if base + suffix in names:
            return base + suffix
    return None


def load_fp8_checkpoint(path: str | Path, *, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """An HF Llama-family model from a local FP8 checkpoint directory, its projections in FP8
    (see the module doc for the formats). Raises ModelLoadError on anything it cannot map."""
    from safetensors import safe_open
    from transformers import AutoConfig

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    qcfg = getattr(config, "quantization_config", None)
    if qcfg is not None and not isinstance(qcfg, dict):
        qcfg = qcfg.to_dict()
    method = checkpoint_format(qcfg)
    if method is None:
        raise ModelLoadError(f"{path} has no quantization_config")
    if config.model_type == "mixtral":
        raise ModelLoadError("FP8 Mixtral checkpoints are not supported; use --quantize fp8 on the bf16 checkpoint")
    del config.quantization_config  # transformers' quantizers are not used: the runner runs FP8
    ub = float(qcfg["activation_scale_ub"]) if method == "fbgemm_fp8" and "activation_scale_ub" in qcfg else None
    block = qcfg.get("weight_block_size") if method == "fp8" else None
    model = empty_model(config, device=device, dtype=dtype)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    seen: set[str] = set()
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no safetensors files in {path}")
    with torch.no_grad():
        for file in files:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                names = set(f.keys())
                for name in sorted(names):
                    if name.endswith(IGNORED_SUFFIXES) or name.endswith(SCALE_SUFFIXES):
                        continue
                    tensor = f.get_tensor(name)
                    owner = modules.get(name.removesuffix(".weight"))
                    if tensor.dtype == fp8.FP8:
                        scale = _scale_name(names, name)
                        if scale is None or owner is None or not isinstance(owner, torch.nn.Linear):
                            raise ModelLoadError(f"FP8 tensor {name!r} has no scale or no projection to go to")
                        s = f.get_tensor(scale)
                        if block and s.dim() == 2 and s.numel() > 1:
                            w = fp8.from_block_scaled(tensor, s, (int(block[0]), int(block[1])))
                        else:
                            w = fp8.from_scaled(tensor, s, act_scale_ub=ub)
                        fp8.attach(owner, w)
                        owner.weight = torch.nn.Parameter(
                            torch.empty(0, dtype=dtype, device=device), requires_grad=False
                        )
                        seen.add(name)
                    elif name in params:
                        p = params[name]
                        if p.device.type == "meta":  # a projection kept in bf16 ("ignore" lists)
                            module_name, pname = name.rsplit(".", 1)
                            _materialise(modules[module_name], pname, device, dtype)
                            p = modules[module_name]._parameters[pname]
                        p.copy_(tensor)
                        seen.add(name)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        seen.add("lm_head.weight")
    missing = sorted(set(params) - seen)
    if missing:
        raise ModelLoadError(f"FP8 checkpoint {path} lacks {len(missing)} tensors, e.g. {missing[0]!r}")
    log.info(
        "loaded %s FP8 checkpoint %s (%d FP8 projections)", method, path, sum(1 for _ in fp8.decoder_linears(model))
    )
    return model
