"""LoRA (Hu et al. 2021) and QLoRA (Dettmers et al. 2023): low-rank adapters on a built model's projections.

`apply_lora(model, LoRAConfig)` swaps each targeted projection, a float `nn.Linear` or (QLoRA)
quantize.py's `Int8Linear` / `Int4Linear`, for a LoRA layer of the same base type. The LoRA layer
holds the base layer's own tensors under their own names (`layers.0.attention.wq.weight`), so base
checkpoints load unchanged, and adds `lora_a` (rank, in) and `lora_b` (out, rank):

    y = base(x) + (alpha / rank) * dropout(x) A^T B^T        B = 0 at the start: the base model exactly

`merge_lora` folds (alpha / rank) B A into the weight (torchtune `peft/lora.py`); `lora_disabled`
switches every adapter off, which makes the model its own frozen reference for DPO (no second copy).
Nothing in model.py knows about any of this: it is a transform of a built model, like quantize_model.

QLoRA: a quantized base is dequantized in forward and again in backward instead of being kept for
backward (`_FrozenQuantLinear`, the role bitsandbytes' 4-bit matmul plays in QLoRA), so training
memory is the int4/int8 weights, the adapters and the activations.

Adapters save as `adapter.safetensors` + `adapter.json` (our names, rank, alpha, targets, the base
config) and export to PEFT's layout, `adapter_model.safetensors` + `adapter_config.json`, with HF
module names from weights.HF_NAMES and the B rows of q/k permuted to HF's rotate-half order, so
transformers + peft load them; `load_adapter` reads either layout.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .errors import LlamaforgeError
from .quantize import QUANTIZED_LINEARS, BlockLinear, Int4Linear, Int8Linear

# target -> the block submodule holding it (Meta names; HF names live in weights.HF_NAMES)
TARGETS = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
           "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}
GROUPS = {"attention": ("wq", "wk", "wv", "wo"), "mlp": ("w1", "w2", "w3"), "all": tuple(TARGETS)}
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter.json"
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."


def _hf_module(ours: str) -> str:
    """'layers.3.attention.wq' -> 'model.layers.3.self_attn.q_proj' through weights.HF_NAMES."""
    from .weights import _TO_HF, rename
    hf = rename(ours + ".weight", _TO_HF)
    if hf is None:
        raise LlamaforgeError(f"{ours} has no HF name")
    return hf.removesuffix(".weight")


HF_TARGETS = {t: _hf_module(f"layers.0.{p}.{t}").rsplit(".", 1)[1] for t, p in TARGETS.items()}  # wq -> q_proj


@dataclass
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = field(default_factory=lambda: GROUPS["all"])

    def __post_init__(self):
        self.targets = parse_targets(self.targets)
        if self.rank < 1:
            raise LlamaforgeError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise LlamaforgeError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def parse_targets(spec) -> tuple[str, ...]:
    """'wq,wv' / 'attention' / 'mlp' / 'all' / HF names ('q_proj') -> our target names, in order, once each."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    from_hf = {v: k for k, v in HF_TARGETS.items()}
    out = []
    for t in (str(x).strip() for x in items):
        if not t:
            continue
        if t in GROUPS:
            out += GROUPS[t]
        elif t in TARGETS or t in from_hf:
            out.append(from_hf.get(t, t))
        else:
            raise LlamaforgeError(f"unknown LoRA target module {t!r}: choose from {', '.join(TARGETS)} "
                                  f"(HF: {', '.join(HF_TARGETS.values())}) or the groups attention, mlp, all")
    if not out:
        raise LlamaforgeError("no LoRA target modules given: pass e.g. --targets all, attention, mlp or wq,wv")
    return tuple(dict.fromkeys(out))


# ---- the layer ----

class _FrozenQuantLinear(torch.autograd.Function):
    """x W^T for a frozen quantized W: dequantized for the forward product and again for the backward
    one (grad_x = grad_y W), never saved, so backward keeps no float copy of the weights."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantize(grad.dtype), None


def frozen_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` differentiable in x: a quantized layer runs as a dequantized (not saved) matmul."""
    if isinstance(layer, QUANTIZED_LINEARS):
        return _FrozenQuantLinear.apply(x, layer)
    return layer(x)


class LoRAMixin:
    """The adapter half of a LoRA layer; the classes below put it in front of a base layer type, so
    the base's forward, buffers and state-dict names stay exactly as they were."""

    def init_lora(self, rank: int, alpha: float, dropout: float) -> None:
        w = self.weight  # a float parameter, or the quantized base's int buffer
        dtype = w.dtype if w.is_floating_point() else torch.float32
        self.rank, self.scaling, self.lora_enabled = rank, alpha / rank, True
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, dtype=dtype, device=w.device))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's and PEFT's init for A
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantized = isinstance(self, QUANTIZED_LINEARS)
        if quantized and (self.training or x.requires_grad):  # the packed decode kernels have no backward
            y = _FrozenQuantLinear.apply(x, self)
        else:
            y = super().forward(x)
        if not self.lora_enabled:
            return y
        a, b = self.lora_a, self.lora_b
        return y + ((self.lora_dropout(x).to(a.dtype) @ a.t()) @ b.t()).to(y.dtype) * self.scaling  # (..., out)

    def delta(self) -> torch.Tensor:
        """(alpha / rank) B A: what merging adds to the weight, (out, in) fp32."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora rank={self.rank}, scaling={self.scaling:g}"


class LoRALinear(LoRAMixin, nn.Linear):
    """LoRA over a float projection."""


class LoRAInt8Linear(LoRAMixin, Int8Linear):
    """QLoRA over an int8 projection."""


class LoRAInt4Linear(LoRAMixin, Int4Linear):
    """QLoRA over an int4 projection."""


class LoRABlockLinear(LoRAMixin, BlockLinear):
    """QLoRA over a projection kept as GGUF blocks."""


LORA_TYPES = {nn.Linear: LoRALinear, Int8Linear: LoRAInt8Linear, Int4Linear: LoRAInt4Linear, BlockLinear: LoRABlockLinear}


def lora_layer(base: nn.Module, lc: LoRAConfig) -> nn.Module:
    """A LoRA layer over `base` that holds base's own tensors (not copies) under their own names."""
    cls = LORA_TYPES.get(type(base))
    if cls is None:
        raise LlamaforgeError(f"cannot put LoRA on a {type(base).__name__}: supported bases are "
                              f"{', '.join(t.__name__ for t in LORA_TYPES)}")
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    for k, v in vars(base).items():  # plain attributes: in_features, out_features, group_size, layout, refine
        if not k.startswith("_") and k != "training":
            setattr(layer, k, v)
    for k, p in base._parameters.items():
        layer.register_parameter(k, p)
    for k, b in base._buffers.items():
        layer.register_buffer(k, b, persistent=k not in base._non_persistent_buffers_set)
    layer.init_lora(lc.rank, lc.alpha, lc.dropout)
    return layer.train(base.training)


def _blocks(model: nn.Module):
    for block in model.layers:
        yield getattr(block, "_checkpoint_wrapped_module", block)


def apply_lora(model: nn.Module, lc: LoRAConfig) -> nn.Module:
    """Freeze the model and put LoRA layers on the targeted projections of every block, in place."""
    for p in model.parameters():
        p.requires_grad_(False)
    for block in _blocks(model):
        for t in lc.targets:
            parent = getattr(block, TARGETS[t])
            child = getattr(parent, t)
            if isinstance(child, LoRAMixin):
                raise LlamaforgeError(f"{t} already has a LoRA adapter: merge it first (merge_lora) to stack another")
            parent.add_module(t, lora_layer(child, lc))
    return model


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module, str, LoRAMixin]]:
    """(module name, parent, attribute, layer) of every LoRA layer, names without wrapper prefixes."""
    out = []
    for i, block in enumerate(_blocks(model)):
        for part in ("attention", "feed_forward"):
            parent = getattr(block, part)
            for attr, child in parent.named_children():
                if isinstance(child, LoRAMixin):
                    out.append((f"layers.{i}.{part}.{attr}", parent, attr, child))
    return out


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, _, _, layer in lora_layers(model):
        out[f"{name}.lora_a"], out[f"{name}.lora_b"] = layer.lora_a.detach(), layer.lora_b.detach()
    return out


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight: each LoRA layer becomes a plain float nn.Linear, in place.
    A quantized base is dequantized first (the merged model is float; quantize it again if wanted)."""
    for _, parent, attr, layer in lora_layers(model):
        if isinstance(layer, nn.Linear):  # a new tensor: the base may be a read-only mapping of the checkpoint
            w = nn.Parameter(layer.weight + layer.delta().to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
        else:
            w = nn.Parameter(layer.dequantize(torch.float32) + layer.delta(), requires_grad=False)
        lin = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
        lin.weight = w
        if getattr(layer, "bias", None) is not None:
            lin.bias = layer.bias
        parent.add_module(attr, lin.train(layer.training))
    return model


@contextmanager
def lora_disabled(model: nn.Module):
    """The base model: every adapter off inside the block (DPO's reference)."""
    layers = [layer for *_, layer in lora_layers(model)]
    for layer in layers:
        layer.lora_enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.lora_enabled = True


# ---- adapters on disk ----

def _replace_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_adapter(dst: str | Path, state: dict[str, torch.Tensor], lc: LoRAConfig, cfg: ModelConfig,
                 base_model: str = "", extra: dict | None = None, peft: bool = True) -> None:
    """dst/adapter.safetensors + adapter.json, and (peft) the PEFT layout beside them. Each file is
    replaced atomically; the JSON files go last, so a reader never pairs a config with old weights' absence."""
    from safetensors.torch import save_file
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    lora = {k: v.detach().cpu().contiguous() for k, v in state.items() if k.endswith((".lora_a", ".lora_b"))}
    if not lora:
        raise LlamaforgeError("no LoRA weights to save: apply_lora first")
    _replace_atomic(dst / ADAPTER_WEIGHTS, lambda t: save_file(lora, str(t), metadata={"format": "pt"}))
    if peft:
        _replace_atomic(dst / PEFT_WEIGHTS, lambda t: save_file(to_peft(lora, cfg), str(t), metadata={"format": "pt"}))
        _replace_atomic(dst / PEFT_CONFIG, lambda t: t.write_text(json.dumps(peft_config(lc, base_model), indent=2) + "\n"))
    meta = {"format": "llamaforge-lora", "version": 1, **asdict(lc), "targets": list(lc.targets),
            "base_model": str(base_model), "base_config": cfg.to_dict(), **(extra or {})}
    _replace_atomic(dst / ADAPTER_CONFIG, lambda t: t.write_text(json.dumps(meta, indent=2) + "\n"))


def peft_config(lc: LoRAConfig, base_model: str = "") -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model) or None,
            "r": lc.rank, "lora_alpha": lc.alpha, "lora_dropout": lc.dropout,
            "target_modules": [HF_TARGETS[t] for t in lc.targets], "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "layers_to_transform": None}


def _qk_heads(name: str, cfg: ModelConfig) -> int | None:
    t = name.rsplit(".", 1)[1]
    return cfg.n_heads if t == "wq" else cfg.n_kv_heads if t == "wk" else None


def to_peft(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our adapter names and RoPE layout -> PEFT's (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).
    A acts on the input, which HF and we order alike; B's rows are q/k output rows: permuted as the weight is."""
    from .weights import interleaved_to_hf
    out = {}
    for k, v in state.items():
        module, kind = k.rsplit(".", 1)
        heads = _qk_heads(module, cfg)
        if kind == "lora_b" and heads:
            v = interleaved_to_hf(v, heads)
        out[f"{PEFT_PREFIX}{_hf_module(module)}.{'lora_A' if kind == 'lora_a' else 'lora_B'}.weight"] = v.contiguous()
    return out


def from_peft(state: dict[str, torch.Tensor], cfg: ModelConfig, path: Path) -> dict[str, torch.Tensor]:
    from .weights import _FROM_HF, hf_to_interleaved, rename
    out = {}
    for k, v in state.items():
        hf = k.removeprefix(PEFT_PREFIX).replace(".default.", ".")  # in-memory PEFT names carry the adapter's name
        hf_module, kind, _ = hf.rsplit(".", 2) if hf.count(".") >= 2 else (hf, "", "")
        ours = rename(hf_module + ".weight", _FROM_HF) if kind in ("lora_A", "lora_B") else None
        if ours is None:
            raise LlamaforgeError(f"{path}: tensor {k!r} is not a LoRA A/B matrix of a llama projection")
        module = ours.removesuffix(".weight")
        heads = _qk_heads(module, cfg)
        if kind == "lora_B" and heads:
            v = hf_to_interleaved(v, heads)
        out[f"{module}.{'lora_a' if kind == 'lora_A' else 'lora_b'}"] = v
    return out


def read_adapter(path: str | Path, cfg: ModelConfig) -> tuple[LoRAConfig, dict[str, torch.Tensor], dict]:
    """-> (LoRA config, our-named tensors, the adapter's JSON) from either layout."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from .weights import read_json
    path = Path(path)
    if (path / ADAPTER_CONFIG).exists():
        meta, weights = read_json(path / ADAPTER_CONFIG), path / ADAPTER_WEIGHTS
        try:
            lc = LoRAConfig(rank=int(meta["rank"]), alpha=float(meta["alpha"]), dropout=float(meta.get("dropout", 0.0)),
                            targets=meta["targets"])
        except (KeyError, TypeError, ValueError) as e:
            raise LlamaforgeError(f"{path / ADAPTER_CONFIG} is missing or has a bad value for {e}") from None
        base = meta.get("base_config") or {}
        keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size")
        if base and any(base.get(k) != getattr(cfg, k) for k in keys):
            raise LlamaforgeError(f"adapter {path} was trained on a different model ({', '.join(f'{k} {base.get(k)}' for k in keys)}); "
                                  f"this model has {', '.join(f'{k} {getattr(cfg, k)}' for k in keys)}")
        peft = False
    elif (path / PEFT_CONFIG).exists():
        meta, weights, peft = read_json(path / PEFT_CONFIG), path / PEFT_WEIGHTS, True
        if meta.get("peft_type", "LORA") != "LORA" or meta.get("use_dora") or meta.get("use_rslora"):
            raise LlamaforgeError(f"{path}: only plain LoRA PEFT adapters load (peft_type LORA, no DoRA or rsLoRA)")
        targets = meta.get("target_modules")
        if not isinstance(targets, list):
            raise LlamaforgeError(f"{path / PEFT_CONFIG}: target_modules must be a list of module names, got {targets!r}")
        lc = LoRAConfig(rank=int(meta["r"]), alpha=float(meta["lora_alpha"]), dropout=float(meta.get("lora_dropout") or 0.0),
                        targets=targets)
    else:
        raise LlamaforgeError(f"{path} is not an adapter directory: expected {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS} (llamaforge) "
                              f"or {PEFT_CONFIG} + {PEFT_WEIGHTS} (PEFT)")
    if not weights.exists():
        raise LlamaforgeError(f"{path}: {weights.name} is missing")
    try:
        state = load_file(str(weights))
    except SafetensorError as e:
        raise LlamaforgeError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    return lc, (from_peft(state, cfg, path) if peft else state), meta


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | Path) -> LoRAConfig:
    """Put the adapter at `path` (either layout) on `model`, in place; -> its config."""
    lc, state, _ = read_adapter(path, model.config)
    apply_lora(model, lc)
    params = {f"{name}.{k}": getattr(layer, k) for name, _, _, layer in lora_layers(model) for k in ("lora_a", "lora_b")}
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise LlamaforgeError(f"adapter {path} does not match its own targets on this model: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
    for k, p in params.items():
        if tuple(state[k].shape) != tuple(p.shape):
            raise LlamaforgeError(f"adapter {path}: {k} has shape {tuple(state[k].shape)}, this model needs {tuple(p.shape)}: "
                                  "it was trained on another model")
        p.copy_(state[k])
    return lc
