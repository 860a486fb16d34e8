"""Writing GGUF files llama.cpp loads: hyperparameters, tokenizer vocabulary (byte-level BPE, tiktoken,
SentencePiece) and tensors in F32/F16/BF16/Q8_0/Q4_0/Q4_1 through gguf-py's writer and quantizers, and
llama.cpp's Q4_K_M and Q6_K mixes through kquants.py, atomically (temp file + rename), with each
quantizer's reconstruction error.
"""
from __future__ import annotations

import base64
import json
import math
import os
import uuid
from pathlib import Path

import numpy as np
import torch

from . import kquants
from .config import ModelConfig
from .errors import LlamaforgeError
from .gguf import dequantize, map_name, rope_freq_factors
from .tokenizer import bytes_to_unicode
from .weights import expected_shapes

_QTYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
           "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
           **kquants.FILE_TYPES}


def _tensor_type(gguf_name: str, shape: tuple[int, ...], qtype: str, n_layer: int = 0, has_output: bool = True):
    """The type one tensor is stored as: 1-D tensors stay F32; K-quant files follow llama.cpp's mix
    (kquants.tensor_type_name); 4-bit files keep the embedding and output at Q8_0 (llama-quantize
    keeps them at 6+ bits too); rows that are not a whole number of blocks fall back to F16, as
    llama.cpp's converter does."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
    if len(shape) == 1:
        return Q.F32
    if qtype in kquants.FILE_TYPES:
        return Q[kquants.tensor_type_name(gguf_name, shape[-1], qtype, n_layer, has_output)]
    t = Q[_QTYPES[qtype][0]]
    if t in (Q.Q4_0, Q.Q4_1) and gguf_name in ("token_embd.weight", "output.weight"):
        t = Q.Q8_0
    if shape[-1] % GGML_QUANT_SIZES[t][0]:
        t = Q.F16
    return t


def write_gguf(path: str | Path, cfg: ModelConfig, state_dict: dict[str, torch.Tensor], tokenizer=None,
               chat_template: str | None = None, qtype: str = "f32", name: str = "") -> dict[str, tuple[str, float]]:
    """Write a llama.cpp-loadable GGUF file atomically (temp file + rename).

    `state_dict` uses our names, fp32 tensors, interleaved-pair RoPE layout (what `GGUFFile`,
    `load_hf` and `load_meta` return). Returns, per written tensor, (type, max abs error of the
    stored values), the quantizers' reconstruction error.
    """
    import gguf
    if qtype not in _QTYPES:
        raise LlamaforgeError(f"unknown GGUF tensor type {qtype!r}; choose one of {', '.join(_QTYPES)}")
    path = Path(path)
    tensors = _gguf_tensors(cfg, state_dict)
    w = gguf.GGUFWriter(None, "llama")
    _write_hparams(w, cfg, name, gguf.LlamaFileType[_QTYPES[qtype][1]])
    if tokenizer is not None:
        _write_tokenizer(w, tokenizer, cfg.vocab_size)
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template:
        w.add_chat_template(template)
    plan = []
    for gname, t in tensors.items():
        ttype = _tensor_type(gname, tuple(t.shape), qtype, cfg.n_layers, "output.weight" in tensors)
        block, type_size = gguf.GGML_QUANT_SIZES[ttype]
        w.add_tensor_info(gname, tuple(t.shape), np.dtype(np.float32), t.numel() // block * type_size, raw_dtype=ttype)
        plan.append((gname, t, ttype))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # same directory: rename is atomic
    report = {}
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for gname, t, ttype in plan:  # one tensor at a time: quantize, write, forget
            arr = t.detach().float().contiguous().numpy()
            data = kquants.quantize(arr, ttype.name) if ttype.name in kquants.BLOCK_TYPES else gguf.quants.quantize(arr, ttype)
            w.write_tensor_data(data)
            report[gname] = (ttype.name, _max_error(data, ttype, t))
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    return report


def _max_error(data: np.ndarray, ttype, t: torch.Tensor) -> float:
    if ttype.name == "F32" or t.numel() == 0:
        return 0.0
    back = dequantize(torch.from_numpy(data.view(np.uint8)).view(math.prod(t.shape[:-1]), -1), ttype, tuple(t.shape))
    return float(back.sub_(t.detach().float()).abs_().max())


def _gguf_tensors(cfg: ModelConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> GGUF names, checked against the config; tied output omitted, rope_freqs added."""
    want = expected_shapes(cfg)
    sd = {k: v for k, v in state_dict.items() if not (k == "output.weight" and cfg.tie_embeddings)}
    for k, v in sd.items():
        if map_name(k, to_gguf=True) is None:
            raise LlamaforgeError(f"cannot write tensor {k!r} to GGUF: not a llama weight (quantized or LoRA modules must be merged first)")
        if not v.is_floating_point():
            raise LlamaforgeError(f"cannot write tensor {k!r} of dtype {v.dtype} to GGUF: pass floating-point weights")
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    wrong = [f"{k} {tuple(sd[k].shape)} (config: {want[k]})" for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    if missing or extra or wrong:
        raise LlamaforgeError(f"the state dict does not match the config: missing {missing[:3]}, unexpected {extra[:3]}, "
                              f"wrong shapes {wrong[:2]}")
    out = {}
    if cfg.rope_scaling:
        out["rope_freqs.weight"] = rope_freq_factors(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    out.update({map_name(k, to_gguf=True): v for k, v in sd.items()})
    return out


def _write_hparams(w, cfg: ModelConfig, name: str, file_type) -> None:
    if name or cfg.name:
        w.add_name(name or cfg.name)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))
    w.add_file_type(int(file_type))
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)
    if file_type.name not in ("ALL_F32", "MOSTLY_F16", "MOSTLY_BF16"):
        w.add_quantization_version(2)  # GGML_QNT_VERSION


# ---- tokenizer -> tokenizer.ggml.* (convert_hf_to_gguf.py get_vocab_base / _set_vocab_sentencepiece) ----

_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5  # GGUF token types (gguf-py TokenType)


def _write_tokenizer(w, tokenizer, vocab_size: int) -> None:
    kind = getattr(tokenizer, "kind", None)
    if kind == "bpe":
        v = _bpe_vocab(tokenizer.tok, tokenizer.specials)
    elif kind == "tiktoken":
        v = _tiktoken_vocab(tokenizer)
    elif kind == "sentencepiece":
        v = _spm_vocab(tokenizer)
    else:
        raise LlamaforgeError(f"cannot write a {type(tokenizer).__name__} tokenizer to GGUF: "
                              "supported are byte-level BPE, SentencePiece and tiktoken")
    tokens, types, scores = v["tokens"], v["types"], v.get("scores")
    if len(tokens) > vocab_size:
        raise LlamaforgeError(f"the tokenizer has {len(tokens)} tokens but the model's vocab_size is {vocab_size}")
    for i in range(len(tokens), vocab_size):  # padded embedding rows, named as llama.cpp's converter does
        tokens.append(f"[PAD{i}]")
        types.append(_UNUSED)
        if scores is not None:
            scores.append(-1000.0)
    w.add_tokenizer_model(v["model"])
    if v.get("pre"):
        w.add_tokenizer_pre(v["pre"])
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if v.get("merges"):
        w.add_token_merges(v["merges"])
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else v.get("pad")
    for add, i in ((w.add_bos_token_id, tokenizer.bos_id), (w.add_eos_token_id, tokenizer.eos_id),
                   (w.add_unk_token_id, v.get("unk")), (w.add_pad_token_id, pad)):
        if i is not None:
            add(int(i))
    if "add_space_prefix" in v:
        w.add_add_space_prefix(v["add_space_prefix"])
    w.add_add_bos_token(bool(tokenizer.add_bos))
    w.add_add_eos_token(False)


def _pre_name(pt: dict | None) -> str:
    """tokenizer.json `pre_tokenizer` -> llama.cpp's `tokenizer.ggml.pre` name."""
    from .tokenizer import GPT2_PATTERN, LLAMA3_PATTERN
    items = (pt.get("pretokenizers") if pt and pt.get("type") == "Sequence" else [pt] if pt else []) or []
    kinds = [p.get("type") for p in items]
    regex = lambda p: (p.get("pattern") or {}).get("Regex")  # noqa: E731
    if kinds == ["ByteLevel"] and items[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and regex(items[0]) == GPT2_PATTERN and not items[1].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and items[0].get("individual_digits") and items[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and regex(items[0]) == LLAMA3_PATTERN and not items[1].get("use_regex", True):
        return "llama-bpe"
    raise LlamaforgeError(f"cannot name this tokenizer's pre-tokenizer for llama.cpp ({json.dumps(pt)[:120]}); "
                          "supported are GPT-2 (gpt-2), SmolLM (smollm) and Llama 3 (llama-bpe) byte-level BPE")


def _bpe_vocab(tok, specials: dict[str, int]) -> dict:
    """A byte-level BPE `tokenizers.Tokenizer` -> GGUF `gpt2` vocabulary."""
    data = json.loads(tok.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise LlamaforgeError("GGUF 'gpt2' vocabularies are byte-level BPE; this tokenizer.json is "
                              f"{model.get('type')} with a {(data.get('decoder') or {}).get('type')} decoder")
    pre = _pre_name(data.get("pre_tokenizer"))
    vocab = tok.get_vocab(with_added_tokens=True)
    n = max(vocab.values()) + 1
    tokens, types = [f"[PAD{i}]" for i in range(n)], [_UNUSED] * n
    for t, i in vocab.items():
        tokens[i], types[i] = t, _NORMAL
    for i, added in tok.get_added_tokens_decoder().items():
        types[i] = _CONTROL if added.special else _USER_DEFINED
    for t, i in specials.items():
        types[i] = _CONTROL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "merges": merges, "add_space_prefix": False,
            "unk": vocab.get(model.get("unk_token")) if model.get("unk_token") else None}


def _tiktoken_vocab(tokenizer) -> dict:
    """tiktoken ranks -> byte-level tokens and merges: transformers' TikTokenConverter, which lists
    every split of a token into two tokens of lower rank, ordered by (rank, left rank, right rank)."""
    ranks = {}
    for line in Path(tokenizer.path).read_text().splitlines():
        if line.strip():
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    b2u = bytes_to_unicode()
    text = lambda b: "".join(b2u[c] for c in b)  # noqa: E731
    merges = []
    for token, rank in ranks.items():
        found = []
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                found.append((ranks[left], ranks[right], left, right))
        merges.extend((rank, lr, rr, f"{text(left)} {text(right)}") for lr, rr, left, right in found)
    merges.sort(key=lambda m: m[:3])
    tokens = [""] * len(ranks)
    for token, rank in ranks.items():
        tokens[rank] = text(token)
    types = [_NORMAL] * len(tokens)
    for s, i in sorted(tokenizer.specials.items(), key=lambda kv: kv[1]):
        if i != len(tokens):
            raise LlamaforgeError(f"tiktoken special token {s!r} has id {i}; expected the specials right after the {len(ranks)} ranks")
        tokens.append(s)
        types.append(_CONTROL)
    return {"model": "gpt2", "pre": "llama-bpe", "tokens": tokens, "types": types, "merges": [m[3] for m in merges],
            "add_space_prefix": False}


def _spm_vocab(tokenizer) -> dict:
    """SentencePiece ModelProto -> GGUF `llama` vocabulary; sentencepiece's piece types are GGUF's token types."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    m = pb.ModelProto()
    m.ParseFromString(tokenizer.proto)
    if m.trainer_spec.model_type != pb.TrainerSpec.BPE:
        raise LlamaforgeError("GGUF 'llama' vocabularies are SentencePiece BPE; this tokenizer.model is a "
                              f"{pb.TrainerSpec.ModelType.Name(m.trainer_spec.model_type)} model")
    sp = tokenizer.sp
    return {"model": "llama", "tokens": [p.piece for p in m.pieces], "types": [int(p.type) for p in m.pieces],
            "scores": [float(p.score) for p in m.pieces], "unk": sp.unk_id() if sp.unk_id() >= 0 else None,
            "pad": sp.pad_id() if sp.pad_id() >= 0 else None, "add_space_prefix": bool(m.normalizer_spec.add_dummy_prefix)}
