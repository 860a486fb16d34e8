"""Checkpoint formats other than GGUF: Hugging Face safetensors and Meta `consolidated.*.pth`.

Our names are Meta's (`layers.{i}.attention.wq`...). HF names live only in the `HF_NAMES` map.
HF checkpoints rotate halves in RoPE, Meta and we rotate interleaved pairs: Q/K rows are
permuted once here (`hf_to_interleaved` / `interleaved_to_hf`, the inverse of transformers'
`convert_llama_weights_to_hf.permute`). Meta .pth files load with `weights_only=True`, so no
pickled code ever runs. Models are built on the meta device and filled with `assign=True`
(gpt-fast `_load_model`), so weights are not copied twice.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .config import ModelConfig, matching_configs
from .errors import LlamaforgeError
from .model import Transformer

HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
}


def _compile(mapping: dict[str, str]):
    rx = lambda p: re.compile("^" + re.escape(p).replace(r"\{i\}", r"(?P<i>\d+)") + "$")  # noqa: E731
    return [(rx(a), b) for a, b in mapping.items()]


_TO_HF = _compile(HF_NAMES)
_FROM_HF = _compile({v: k for k, v in HF_NAMES.items()})


def rename(name: str, table) -> str | None:
    for pat, out in table:
        m = pat.match(name)
        if m:
            return out.format(**m.groupdict())
    return None


def hf_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half Q/K rows -> interleaved pairs. w: (n_heads * head_dim, dim)."""
    out_dim, dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, dim).transpose(1, 2).reshape(out_dim, dim)


def interleaved_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim, dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, dim).transpose(1, 2).reshape(out_dim, dim)


def read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlamaforgeError(f"{path} is not a readable JSON file: {e}") from None
    except RecursionError:
        raise LlamaforgeError(f"{path} is not a readable JSON file: it nests too deeply") from None
    if not isinstance(d, dict):
        raise LlamaforgeError(f"{path} holds a JSON {type(d).__name__}, expected an object")
    return d


# ---- checking a file's header before anything is built ----

# Sizes a model file may claim (a lying or corrupt header must not build 10^6 layers): generous
# upper bounds over every llama-family model (Llama 3.1 405B: dim 16384, 126 layers, 128 heads,
# ffn 53248; vocabularies to 256k; contexts to 1M).
CONFIG_LIMITS = {"dim": 1 << 16, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024, "hidden_dim": 1 << 20,
                 "vocab_size": 1 << 22, "max_seq_len": 1 << 24}


def checked_config(where, keys: dict[str, str], **values) -> ModelConfig:
    """`ModelConfig(**values)` from a file's header, each value checked first: sizes are integers in
    1..CONFIG_LIMITS, `norm_eps` / `rope_theta` finite positive numbers, the head size even. `keys`
    names each field as the file spells it (`llama.block_count`, `num_hidden_layers`) for the message."""
    import math

    def bad(field, value, want):
        return LlamaforgeError(f"{where}: {keys.get(field, field)} is {repr(value)[:40]}, expected {want}: "
                               "the file is corrupt or not a llama model")
    def check_sizes(get, optional=()):
        for field, limit in CONFIG_LIMITS.items():
            v = get(field)
            if not (v is None and field in optional) and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= limit):
                raise bad(field, v, f"an integer in 1..{limit:,}")
    check_sizes(values.get, optional=("n_kv_heads", "hidden_dim"))  # None: derived by ModelConfig
    for field in ("norm_eps", "rope_theta", "multiple_of", "ffn_dim_multiplier"):
        v = values.get(field)
        if field in values and not (v is None and field == "ffn_dim_multiplier"):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0 < v < 1e30):
                raise bad(field, v, "a positive number")
            values[field] = int(v) if field == "multiple_of" else float(v)
    try:
        cfg = ModelConfig(**values)
    except (LlamaforgeError, ZeroDivisionError) as e:
        raise LlamaforgeError(f"{where}: {str(e).removeprefix('config ?: ')}: the file is corrupt or not a llama model") from None
    check_sizes(lambda field: getattr(cfg, field))
    if cfg.head_dim % 2:
        raise LlamaforgeError(f"{where}: the head size dim / n_heads = {cfg.head_dim} is odd; RoPE needs an even one")
    return cfg


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our tensor names -> the shapes `Transformer(cfg)` has (the tied output omitted), without building it."""
    q, kv, d, h = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.dim, cfg.hidden_dim
    layer = {"attention_norm": (d,), "ffn_norm": (d,), "attention.wq": (q, d), "attention.wk": (kv, d),
             "attention.wv": (kv, d), "attention.wo": (d, q), "feed_forward.w1": (h, d), "feed_forward.w2": (d, h),
             "feed_forward.w3": (h, d)}
    out = {"tok_embeddings.weight": (cfg.vocab_size, d), "norm.weight": (d,)}
    if not cfg.tie_embeddings:
        out["output.weight"] = (cfg.vocab_size, d)
    out.update({f"layers.{i}.{k}.weight": s for i in range(cfg.n_layers) for k, s in layer.items()})
    return out


def check_shapes(where, cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """The file's tensors (our names -> shapes) against what `cfg` needs: a one-line error naming the first
    missing, unexpected or misshapen tensor, so that a header that lies is caught before anything is built."""
    want = expected_shapes(cfg)
    shapes = {k: tuple(v) for k, v in shapes.items() if not (cfg.tie_embeddings and k == "output.weight")}
    missing, extra = sorted(set(want) - set(shapes)), sorted(set(shapes) - set(want))
    wrong = [f"{k} is {shapes[k]}, the config needs {want[k]}" for k in want if k in shapes and shapes[k] != want[k]]
    if missing or extra or wrong:
        what = (f"tensor {wrong[0]}" if wrong else f"{len(missing)} tensors missing ({', '.join(missing[:2])}...)" if missing
                else f"unexpected tensors ({', '.join(extra[:2])}...)")
        raise LlamaforgeError(f"{where}: {what} ({cfg.n_layers} layers, dim {cfg.dim}, {cfg.n_heads}/{cfg.n_kv_heads} heads, "
                              f"vocab {cfg.vocab_size}): the file is corrupt or its config does not match its weights")


# ---- building a model from a state dict ----

def build_model(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu") -> Transformer:
    """Construct on the meta device and assign the given tensors (checked against the config's shapes first)."""
    check_shapes("checkpoint", cfg, {k: v.shape for k, v in state_dict.items()})
    if cfg.tie_embeddings:
        state_dict = {k: v for k, v in state_dict.items() if k != "output.weight"}
    with torch.device("meta"):
        model = Transformer(cfg)
    sd = {k: v.to(device=device, dtype=dtype or (v.dtype if v.is_floating_point() else torch.float32)) for k, v in state_dict.items()}
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


# ---- Hugging Face ----

_HF_KEYS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
            "n_kv_heads": "num_key_value_heads", "hidden_dim": "intermediate_size", "vocab_size": "vocab_size",
            "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta", "max_seq_len": "max_position_embeddings"}


def config_from_hf(d: dict, where="config.json") -> ModelConfig:
    try:
        return _config_from_hf(d, where)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LlamaforgeError(f"{where} is missing or has a bad value for {e}: not a complete llama config") from None


def _config_from_hf(d: dict, where) -> ModelConfig:
    if d.get("model_type", "llama") != "llama" or d.get("attention_bias") or d.get("mlp_bias"):
        raise LlamaforgeError(f"model_type {d.get('model_type')!r} with biases={bool(d.get('attention_bias') or d.get('mlp_bias'))} "
                              "is not a plain llama model; llamaforge loads model_type 'llama' without biases")
    if d.get("hidden_act", "silu") != "silu":
        raise LlamaforgeError(f"hidden_act {d['hidden_act']!r} is not supported: llama models use silu (SwiGLU)")
    rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
    theta = d.get("rope_theta") or rope.get("rope_theta") or 10000.0
    scaling = None
    rtype = rope.get("rope_type") or rope.get("type")
    if rtype == "llama3":
        scaling = {"factor": float(rope["factor"]), "low_freq_factor": float(rope["low_freq_factor"]),
                   "high_freq_factor": float(rope["high_freq_factor"]),
                   "original_max_seq_len": int(rope["original_max_position_embeddings"])}
    elif rtype not in (None, "default"):
        raise LlamaforgeError(f"rope scaling type {rtype!r} is not supported (supported: default, llama3)")
    heads = d["num_attention_heads"]
    cfg = checked_config(where, _HF_KEYS, dim=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=heads,
                         n_kv_heads=d.get("num_key_value_heads") or heads, hidden_dim=d["intermediate_size"],
                         vocab_size=d["vocab_size"], norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta,
                         rope_scaling=scaling, max_seq_len=d.get("max_position_embeddings", 2048),
                         tie_embeddings=bool(d.get("tie_word_embeddings", False)), name=str(d.get("_name_or_path", "")))
    if d.get("head_dim") not in (None, cfg.head_dim):
        raise LlamaforgeError(f"{where}: head_dim {str(d['head_dim'])[:20]} != hidden_size / num_attention_heads: not supported")
    return cfg


def config_to_hf(cfg: ModelConfig, tokenizer=None) -> dict:
    d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
         "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
         "intermediate_size": cfg.hidden_dim, "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps,
         "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
         "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "head_dim": cfg.head_dim, "torch_dtype": "float32"}
    if cfg.rope_scaling:
        s = cfg.rope_scaling
        d["rope_scaling"] = {"rope_type": "llama3", "factor": s["factor"], "low_freq_factor": s["low_freq_factor"],
                             "high_freq_factor": s["high_freq_factor"], "original_max_position_embeddings": s["original_max_seq_len"]}
    if tokenizer is not None:
        for key, i in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id), ("pad_token_id", tokenizer.pad_id)):
            if i is not None:
                d[key] = i
    return d


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of an HF directory: model.safetensors, or those its index names."""
    index = path / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LlamaforgeError(f"{index} has no weight_map: the index is corrupt")
        files = list(weight_map.values())
        if not all(isinstance(f, str) and f and "/" not in f and "\\" not in f and not f.startswith(".") for f in files):
            raise LlamaforgeError(f"{index} names weight files that are not plain file names: the index is corrupt")
        files = sorted(set(files))
    if not all((path / f).exists() for f in files):
        if any(path.glob("*.bin")):
            raise LlamaforgeError(f"{path} holds pytorch_model.bin weights; llamaforge reads safetensors only "
                                  "(convert them with transformers' save_pretrained(safe_serialization=True))")
        raise LlamaforgeError(f"{path}: missing weight file(s) {[f for f in files if not (path / f).exists()]}")
    return [path / f for f in files]


def read_safetensors(files: list[Path], tensors: bool = True) -> dict[str, tuple]:
    """Our name -> (dtype name, shape, tensor or None) of every llama tensor in the files. A corrupt header
    (bad length, not UTF-8 JSON, offsets out of bounds or overlapping, unknown dtype, absurd shapes,
    truncated data) is a one-line error naming the file, the same for `info`, `convert` and loading."""
    from safetensors import SafetensorError, safe_open
    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    ours = rename(name, _FROM_HF)
                    if ours is None:
                        if name.endswith("rotary_emb.inv_freq"):
                            continue
                        raise LlamaforgeError(f"{f}: unexpected tensor {name!r} for a llama model")
                    sl = fh.get_slice(name)
                    out[ours] = (sl.get_dtype(), tuple(sl.get_shape()), fh.get_tensor(name) if tensors else None)
        except (SafetensorError, OSError, ValueError, TypeError, OverflowError) as e:
            msg = " ".join(str(e).split())[:200]
            raise LlamaforgeError(f"{f} is not a readable safetensors file (truncated or corrupt?): {type(e).__name__}: {msg}") from None
    return out


def load_hf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    cfg = config_from_hf(read_json(path / "config.json"), path / "config.json")
    files = safetensors_files(path)
    check_shapes(path, cfg, {k: shape for k, (_, shape, _) in read_safetensors(files, tensors=False).items()})
    sd = {k: t for k, (_, _, t) in read_safetensors(files).items()}
    for k, v in list(sd.items()):
        if k.endswith("attention.wq.weight"):
            sd[k] = hf_to_interleaved(v, cfg.n_heads)
        elif k.endswith("attention.wk.weight"):
            sd[k] = hf_to_interleaved(v, cfg.n_kv_heads)
    return cfg, sd


# atomic_dir's temporaries: .NAME.tmp<pid>.<random> while written, .NAME.old<pid> while swapped in
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)(?P<pid>\d+)(\.[^.]+)?$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or no way to tell: leave its files alone
    return True


def remove_stale_temporaries(parent: Path, names: str) -> list[Path]:
    """Remove what `atomic_dir` wrote in `parent`, for destinations whose names match the regex `names`, in
    processes that died mid-write (kill -9, power loss): their temporary directories, and a `.old` copy
    once its new version is in place (restored if it is not). Those of live processes are left alone.
    Returns what was removed or restored."""
    done = []
    for p in parent.iterdir() if parent.is_dir() else []:
        m = _TEMPORARY.match(p.name)
        if not m or not re.fullmatch(names, m["name"]) or not p.is_dir() or _alive(int(m["pid"])):
            continue
        target = parent / m["name"]
        if m["kind"] == "old" and not target.exists():
            os.replace(p, target)  # killed between the two renames: the previous version comes back
        else:
            shutil.rmtree(p, ignore_errors=True)
        done.append(p)
    return done


def atomic_dir(dst: Path):
    """Write into a temporary sibling directory, then rename it over `dst` (never half-written).
    Temporaries left by writers that were killed are removed first (`remove_stale_temporaries`)."""
    class _Ctx:
        def __enter__(self):
            dst.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(dst.parent, re.escape(dst.name))
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp{os.getpid()}.", dir=dst.parent))
            self.tmp.chmod(0o755)  # mkdtemp makes 0700; a saved model should be readable like any directory
            return self.tmp

        def __exit__(self, exc_type, exc, tb):
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            if dst.exists():
                old = dst.with_name(f".{dst.name}.old{os.getpid()}")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(dst, old)
                os.replace(self.tmp, dst)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.tmp, dst)
            return False
    return _Ctx()


def save_hf(dst: str | Path, cfg: ModelConfig, state_dict: dict[str, torch.Tensor], tokenizer=None,
            chat_template: str | None = None, dtype: torch.dtype = torch.float32) -> None:
    """A directory transformers loads: config.json, model.safetensors, tokenizer files."""
    from safetensors.torch import save_file
    dst = Path(dst)
    out = {}
    for k, v in state_dict.items():
        if cfg.tie_embeddings and k == "output.weight":
            continue
        if k.endswith("attention.wq.weight"):
            v = interleaved_to_hf(v, cfg.n_heads)
        elif k.endswith("attention.wk.weight"):
            v = interleaved_to_hf(v, cfg.n_kv_heads)
        hf_name = rename(k, _TO_HF)
        if hf_name is None:
            raise LlamaforgeError(f"tensor {k!r} has no HF name: save_hf writes plain llama weights only")
        out[hf_name] = v.detach().to(dtype).contiguous()
    with atomic_dir(dst) as tmp:
        hf_cfg = config_to_hf(cfg, tokenizer)
        hf_cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
            tc = {"add_bos_token": tokenizer.add_bos, "add_eos_token": False, "clean_up_tokenization_spaces": False,
                  # transformers 5 needs the class to keep SentencePiece's leading-space marker
                  **({"tokenizer_class": "LlamaTokenizer"} if tokenizer.kind == "sentencepiece" else {}),
                  "model_max_length": cfg.max_seq_len}
            for key, i in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id), ("pad_token", tokenizer.pad_id)):
                if i is not None:
                    tc[key] = tokenizer.decode([i])
            if chat_template:
                tc["chat_template"] = chat_template
            (tmp / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")


# ---- Meta ----

# Meta's model-parallel shards split these along dim 0 (column parallel) or dim 1 (row parallel).
_META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def config_from_meta(params: dict, vocab_size: int, where="params.json") -> ModelConfig:
    try:
        scaling = None
        if params.get("use_scaled_rope"):
            scaling = {"factor": float(params.get("rope_scaling_factor", 8.0)), "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_seq_len": 8192}
        return checked_config(where, {"vocab_size": "the embedding's rows"}, dim=params["dim"], n_layers=params["n_layers"],
                              n_heads=params["n_heads"], n_kv_heads=params.get("n_kv_heads"), vocab_size=vocab_size,
                              multiple_of=params.get("multiple_of", 256), ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
                              norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 10000.0),
                              rope_scaling=scaling, max_seq_len=params.get("max_seq_len", 2048))
    except (KeyError, TypeError, ValueError) as e:
        raise LlamaforgeError(f"params.json is missing or has a bad value for {e}: not a complete Meta llama config") from None


def merge_meta_shards(shards: list[dict], dim: int) -> dict[str, torch.Tensor]:
    """Concatenate model-parallel shards along the dimension each layer was split on."""
    names = set(shards[0])
    if any(set(s) != names for s in shards):
        odd = sorted(set().union(*shards) - set.intersection(*(set(s) for s in shards)))
        raise LlamaforgeError(f"the consolidated.*.pth shards hold different tensors ({odd[:3]}...): a shard is missing or foreign")
    sd = {}
    for name in shards[0]:
        if name == "rope.freqs":
            continue
        parts = [s[name] for s in shards]
        kind = name.split(".")[-2] if "." in name else name
        if len(parts) == 1 or parts[0].dim() == 1:  # one shard, or a replicated norm
            sd[name] = parts[0]
        elif kind == "tok_embeddings":  # LLaMA 1/2 split the embedding by columns, Llama 3 by rows
            sd[name] = torch.cat(parts, dim=1 if parts[0].shape[1] != dim else 0)
        elif kind in _META_SPLIT:
            sd[name] = torch.cat(parts, dim=_META_SPLIT[kind])
        else:
            raise LlamaforgeError(f"tensor {name!r} is not part of a llama checkpoint")
    return sd


def save_meta(dst: str | Path, cfg: ModelConfig, state_dict: dict[str, torch.Tensor], n_shards: int = 1,
              embed_split: int = 1) -> None:
    """A Meta checkpoint: params.json and `consolidated.NN.pth` model-parallel shards, each tensor split as
    Meta's fairscale layers split it (`_META_SPLIT`; the embedding by columns as LLaMA 1/2, or
    `embed_split=0` by rows as Llama 3), norms whole in every shard."""
    import json
    params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
              "vocab_size": -1, "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "max_seq_len": cfg.max_seq_len}
    with atomic_dir(Path(dst)) as tmp:
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        for i in range(n_shards):
            shard = {}
            for k, v in state_dict.items():  # a tied output is written out: Meta's format has no tying
                kind = k.split(".")[-2]
                d = embed_split if kind == "tok_embeddings" else _META_SPLIT.get(kind)
                shard[k] = v.detach() if d is None or v.dim() == 1 or n_shards == 1 else v.detach().chunk(n_shards, d)[i].clone()
            torch.save(shard, tmp / f"consolidated.{i:02d}.pth")


def torch_load_weights(f: Path) -> dict:
    """torch.load with weights_only=True (tensors and plain containers only: no pickled code runs), mmap'd when possible."""
    import pickle
    try:
        try:
            return torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            return torch.load(f, map_location="cpu", weights_only=True)  # a pre-zipfile (legacy) checkpoint
    except pickle.UnpicklingError:
        raise LlamaforgeError(f"{f} holds pickled objects other than tensors; refused, since loading it could run code") from None
    except Exception as e:
        msg = " ".join(str(e).split())[:200]  # torch's messages span lines
        raise LlamaforgeError(f"{f} is not a readable PyTorch checkpoint (truncated or corrupt?): {msg}") from None


def load_meta(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    params = read_json(path / "params.json")
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise LlamaforgeError(f"{path} has params.json but no consolidated.*.pth weight files")
    shards = []
    for f in files:
        shards.append(torch_load_weights(f))
        if not isinstance(shards[-1], dict) or "tok_embeddings.weight" not in shards[-1]:
            raise LlamaforgeError(f"{f} does not hold a llama state dict (no tok_embeddings.weight)")
    sd = merge_meta_shards(shards, params.get("dim", -1))
    return meta_config(path, params, {k: tuple(v.shape) for k, v in sd.items()}), sd


def meta_config(path: Path, params: dict, shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
    """The config of a Meta checkpoint: params.json, completed from the merged tensors' shapes (our names ->
    shapes) and checked against them."""
    if "tok_embeddings.weight" not in shapes:
        raise LlamaforgeError(f"{path}: the checkpoint has no tok_embeddings.weight: not a llama state dict")
    cfg = config_from_meta(params, shapes["tok_embeddings.weight"][0], path / "params.json")  # params.json often says vocab_size -1
    if "layers.0.feed_forward.w1.weight" in shapes:
        cfg.hidden_dim = shapes["layers.0.feed_forward.w1.weight"][0]
    # params.json records neither the context window nor (for Llama 3.2) the rope scaling factor:
    # take them from the named config of the same shape when there is one.
    named = matching_configs(cfg)
    if named:
        ref = ModelConfig.from_name(named[0])
        cfg.max_seq_len = params.get("max_seq_len", ref.max_seq_len)
        if cfg.rope_scaling and ref.rope_scaling and "rope_scaling_factor" not in params:
            cfg.rope_scaling = dict(ref.rope_scaling)
        cfg.name = cfg.name or named[0]
    check_shapes(path, cfg, shapes)
    return cfg
