"""Tensor-parallel inference: N processes, each holding 1/N of every weight matrix and of the KV cache.

Megatron-LM's split (Shoeybi et al. 2019), applied from outside a built `Transformer` as gpt-fast
`tp.py` and torchtitan `apply_tp` do (model.py knows nothing of it):
- column parallel: wq, wk, wv, w1, w3 keep their rank's rows: n_heads/N query heads, n_kv_heads/N
  key/value heads (the KV cache holds only those) and hidden_dim/N of the feed-forward;
- row parallel: wo and w2 keep the matching input columns; the partial sums are all-reduced by a
  forward hook on `attention` and `feed_forward`;
- vocab parallel: the embedding and output keep vocab/N rows; the embedding's ranks add up their
  rows (each id is found on one rank), the output all-gathers the logits. Meta's LLaMA 1/2 shards
  split the embedding by columns instead (fairscale `ParallelEmbedding`): that layout is kept.

Each rank reads only its slice of the checkpoint: Meta `consolidated.NN.pth` shard NN is rank NN's
when there are N of them (other counts are re-sliced from the memory-mapped shards), safetensors
tensors are read at their offsets (rows, or columns a block of rows at a time), GGUF tensors are
sliced in the mapped file in whole quantization blocks, then repacked into int4/int8 layers (the
default, as `load()` does) or dequantized; the embedding and output are then int8 tables.

Running: rank 0 runs the command (stdin, HTTP, tokenizer, sampling) with a `Leader` in place of its
model, which broadcasts each model call (forward, output, setup_caches, copy_cache) to the other
ranks; they `follow()`, making the same calls, so every collective meets its partners. Gloo on CPUs,
NCCL on GPUs; launched by torchrun.
"""
from __future__ import annotations

import atexit
import copy
import datetime
import os
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .errors import LlamaforgeError
from .model import Transformer

COLUMN = ("wq", "wk", "wv", "w1", "w3")  # split along their outputs (dim 0 of the weight)
ROW = ("wo", "w2")  # split along their inputs (dim 1), outputs all-reduced


# ---- the process group ----

def init_tp(tp: int, device: str | None = None) -> tuple[int, torch.device]:
    """Join torchrun's process group of `tp` ranks: -> (rank, device). Gloo on CPUs, NCCL on CUDA."""
    world = os.environ.get("WORLD_SIZE")
    if "RANK" not in os.environ or world != str(tp):
        raise LlamaforgeError(f"--tp {tp} runs one process per rank: launch with torchrun --nproc_per_node {tp} -m llamaforge ... "
                              f"(this process has WORLD_SIZE={world or 'unset'})")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        # a server's other ranks wait for requests for hours: the default 30-minute timeout would end them
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(days=365))
    return rank, dev


def all_gather_last(x: torch.Tensor, keep: int | None = None) -> torch.Tensor:
    """Concatenate every rank's x along the last dimension (the first `keep` columns)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    out = torch.cat(parts, dim=-1)
    return out if keep is None else out[..., :keep]


def _all_reduce_hook(module, inputs, y: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(y)  # row-parallel partial sums -> the full projection, on every rank
    return y


# ---- what each rank holds ----

def vocab_rows(vocab_size: int, world: int) -> int:
    """Rows of the embedding / output per rank: the vocabulary rounded up to a multiple of N."""
    return -(-vocab_size // world)


def check_divisible(cfg: ModelConfig, world: int, embed: str = "vocab") -> None:
    sizes = {"n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "hidden_dim": cfg.hidden_dim}
    if embed == "dim":
        sizes["dim"] = cfg.dim
    bad = [f"{k} {v}" for k, v in sizes.items() if v % world]
    if bad:
        ok = [n for n in range(1, cfg.n_kv_heads + 1) if all(v % n == 0 for v in sizes.values())]
        raise LlamaforgeError(f"--tp {world} does not divide this model's {', '.join(bad)}: it splits over {ok} ranks")


def shard_of(name: str, cfg: ModelConfig, rank: int, world: int, embed: str = "vocab") -> tuple[int, int, int] | None:
    """(dim, start, length) of tensor `name` that `rank` holds, or None for a replicated tensor (norms)."""
    kind = name.split(".")[-2]
    q, kv, h = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.hidden_dim
    full = {"wq": q, "wk": kv, "wv": kv, "wo": q, "w1": h, "w3": h, "w2": h}.get(kind)
    if full is not None:
        n = full // world
        return (0 if kind in COLUMN else 1), rank * n, n
    if kind == "tok_embeddings" and embed == "dim":
        n = cfg.dim // world
        return 1, rank * n, n
    if kind in ("tok_embeddings", "output"):
        rows = vocab_rows(cfg.vocab_size, world)
        start = min(rank * rows, cfg.vocab_size)
        return 0, start, min(rows, cfg.vocab_size - start)
    return None


class VocabParallelEmbedding(nn.Module):
    """Vocabulary rows [start, start + n) of the table `lookup` (an nn.Embedding, or an int8 table): ids
    outside them look up zeros, and the ranks' sum is the embedding (Megatron `VocabParallelEmbedding`)."""

    def __init__(self, lookup: nn.Module, start: int, n: int):
        super().__init__()
        self.lookup, self.start, self.n = lookup, start, n

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        own = (local >= 0) & (local < self.n)
        x = self.lookup(local.clamp(0, max(self.n - 1, 0)))  # (B, T, dim)
        x = x.masked_fill(~own[..., None], 0)
        dist.all_reduce(x)
        return x


class DimParallelEmbedding(nn.Module):
    """Columns [r dim/N, (r+1) dim/N) of every row, all-gathered (fairscale `ParallelEmbedding`, as in
    Meta's LLaMA 1/2 shards)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return all_gather_last(F.embedding(ids, self.weight))  # (B, T, dim)


# ---- sources: where a rank's slices come from ----

class StateDictSource:
    """Slices of in-memory tensors (a built model's own, or a state dict)."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.sd = state_dict

    def read(self, name: str, shard) -> torch.Tensor:
        t = self.sd[name]
        return t if shard is None else t.narrow(*shard)


class SafetensorsSource:
    """Slices read from safetensors files with plain reads at the tensors' offsets (not a memory map: the
    mapped pages of a whole file would count in every rank's resident memory): rows in one read, columns
    a block of rows at a time. HF Q/K rows rotate halves: whole heads are read, then permuted to
    interleaved pairs. The headers were checked by `weights.read_safetensors` first."""

    CHUNK = 1 << 24  # bytes read at a time for a column slice

    def __init__(self, files: list[Path], head_dim: int):
        import json
        import struct

        from .weights import _FROM_HF, rename
        self.head_dim, self.where = head_dim, {}
        for f in files:
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(n))
            for name, info in header.items():
                ours = rename(name, _FROM_HF) if name != "__metadata__" else None
                if ours is not None:
                    self.where[ours] = (f, 8 + n + info["data_offsets"][0], info["dtype"], tuple(info["shape"]))

    def read(self, name: str, shard) -> torch.Tensor:
        from .weights import hf_to_interleaved
        f, offset, dtype, shape = self.where[name]
        dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}.get(dtype)
        if dt is None:
            raise LlamaforgeError(f"{f}: tensor {name} has dtype {dtype}; llamaforge reads F32, F16, BF16 and F64 weights")
        size = dt.itemsize
        row = size * (shape[1] if len(shape) == 2 else 1)
        with open(f, "rb") as fh:
            def rows(a: int, b: int) -> torch.Tensor:  # rows [a, b) as (b - a, *shape[1:])
                buf = torch.empty((b - a) * row if len(shape) == 2 else shape[0] * size, dtype=torch.uint8)
                fh.seek(offset + a * row)
                if fh.readinto(buf.numpy()) != buf.numel():
                    raise LlamaforgeError(f"{f} is truncated inside tensor {name}")
                return buf.view(dt).view(-1, *shape[1:])
            if shard is None:
                t = rows(0, shape[0]).view(shape)
            elif shard[0] == 0:
                t = rows(shard[1], shard[1] + shard[2])
            else:
                _, s, n = shard
                t = torch.empty(shape[0], n, dtype=dt)
                step = max(1, self.CHUNK // row)
                for a in range(0, shape[0], step):
                    b = min(shape[0], a + step)
                    t[a:b] = rows(a, b)[:, s:s + n]
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            t = hf_to_interleaved(t, t.shape[0] // self.head_dim)
        return t


class GGUFSource:
    """Slices of a memory-mapped GGUF file's tensors, taken before dequantization: rows freely, columns in
    whole quantization blocks. A slice is dequantized (`read`) or, for projections, repacked into an
    int4/int8 layer as `load()` does for a whole file (`module`). Each tensor's mapped pages are
    released once it is read."""

    def __init__(self, gf):
        self.gf = gf

    def _raw(self, name: str, shard):
        """-> (GGUF tensor, raw bytes of the slice (rows, bytes per row), the slice's shape)."""
        import gguf

        from .gguf import map_name
        gname = map_name(name, to_gguf=True)
        t = self.gf.tensors[gname]
        raw, shape = self.gf.raw(gname), t.shape
        if shard is not None:
            dim, s, n = shard
            if dim == 0:
                raw, shape = raw[s:s + n], (n, *shape[1:])
            else:
                bs, ts = gguf.GGML_QUANT_SIZES[t.qtype]
                if s % bs or n % bs:
                    raise LlamaforgeError(f"{self.gf.path}: {gname} is stored in {t.qtype.name} blocks of {bs} columns, and a rank's "
                                          f"{n} columns would split blocks: use another --tp, or a float (F32/F16) GGUF")
                raw, shape = raw[:, s // bs * ts:(s + n) // bs * ts].contiguous(), (shape[0], n)
        return t, raw, shape

    def quantized(self, name: str) -> bool:
        """Whether the file stores `name` in quantized blocks (so that 'auto' keeps it quantized)."""
        from .gguf import map_name
        return self.gf.tensors[map_name(name, to_gguf=True)].qtype.name not in ("F32", "F16", "BF16")

    def read(self, name: str, shard) -> torch.Tensor:
        from .gguf import dequantize
        t, raw, shape = self._raw(name, shard)
        try:
            out = dequantize(raw, t.qtype, shape).clone()  # own memory: F32 data would be a view of the mapping
        except NotImplementedError:
            raise LlamaforgeError(f"{self.gf.path}: tensor {t.name} has quantization type {t.qtype.name}, which llamaforge "
                                  "cannot read") from None
        self.gf.release(t.name)  # the file's pages leave this rank's resident memory
        return out

    def module(self, name: str, shard, mode: str, group_size: int) -> nn.Module | None:
        """The slice of a projection as an int4/int8 layer (quantize.module_from_gguf: Q4_0/Q4_1 blocks repack
        exactly), or None where `mode` 'auto' keeps it float (a float tensor in the file)."""
        from .quantize import module_from_gguf
        t, raw, shape = self._raw(name, shard)
        mod = module_from_gguf(raw, t.qtype.name, shape, mode, group_size)
        self.gf.release(t.name)
        return mod


class MetaSource:
    """Meta `consolidated.NN.pth` shards, memory-mapped, each opened only when a slice needs it: with as
    many shards as ranks, rank r opens shard r only."""

    def __init__(self, files: list[Path], dim: int, home: int = 0):
        self.files, self.dim, self.home, self._open = files, dim, home, {}

    def shard(self, i: int) -> dict:
        if i not in self._open:
            from .weights import torch_load_weights
            sd = torch_load_weights(self.files[i])
            if not isinstance(sd, dict) or "tok_embeddings.weight" not in sd:
                raise LlamaforgeError(f"{self.files[i]} does not hold a llama state dict (no tok_embeddings.weight)")
            self._open[i] = sd
        return self._open[i]

    def split_dim(self, name: str, part: torch.Tensor) -> int | None:
        """The dimension Meta split `name` along across the shards (None: replicated)."""
        from .weights import _META_SPLIT
        if len(self.files) == 1 or part.dim() == 1:
            return None
        kind = name.split(".")[-2]
        if kind == "tok_embeddings":  # LLaMA 1/2 split the embedding by columns, Llama 3 by rows
            return 1 if part.shape[1] != self.dim else 0
        return _META_SPLIT[kind]

    def part(self, i: int, name: str) -> torch.Tensor:
        sd = self.shard(i)
        if name not in sd:
            raise LlamaforgeError(f"{self.files[i]} has no tensor {name}: a shard is missing or foreign")
        return sd[name]

    def full_shape(self, name: str) -> tuple[int, ...]:
        part = self.part(self.home, name)
        cat, shape = self.split_dim(name, part), list(part.shape)
        if cat is not None:
            shape[cat] *= len(self.files)
        return tuple(shape)

    def read(self, name: str, shard) -> torch.Tensor:
        home = self.part(self.home, name)
        cat = self.split_dim(name, home)
        if cat is None:
            return home if shard is None else home.narrow(*shard)
        if shard is None:
            return torch.cat([self.part(i, name) for i in range(len(self.files))], cat)
        dim, start, n = shard
        if dim == cat:  # the shards that overlap [start, start + n)
            P, parts = home.shape[cat], []
            for i in range(start // P, (start + n - 1) // P + 1):
                a, b = max(start, i * P), min(start + n, (i + 1) * P)
                parts.append(self.part(i, name).narrow(cat, a - i * P, b - a))
        else:  # sliced across the split: a piece of every shard
            parts = [self.part(i, name).narrow(dim, start, n) for i in range(len(self.files))]
        return torch.cat(parts, cat) if len(parts) > 1 else parts[0]


# ---- applying the split to a built model ----

def _local_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """The config a rank's modules and KV cache see: its own heads (head_dim, dim, vocab unchanged)."""
    local = copy.copy(cfg)  # not re-derived: head_dim stays dim / n_heads of the whole model
    local.n_heads, local.n_kv_heads = cfg.n_heads // world, cfg.n_kv_heads // world
    return local


def _split_vocab(model: Transformer, read, rank: int, world: int, embed: str, int8: bool) -> None:
    """The embedding and output as this rank's vocab rows (padded to `vocab_rows`), float or, with `int8`,
    one int8 table (as quantize_embeddings makes for one process); or the embedding's columns with
    embed='dim' (float). The output all-gathers its logits."""
    from .quantize import OUTPUT_REFINE, Int8Embedding, Int8Linear
    cfg, rows = model.config, vocab_rows(model.config.vocab_size, world)

    def pad(w: torch.Tensor) -> torch.Tensor:  # the last rank's rows, when N does not divide the vocabulary
        return torch.cat([w, w.new_zeros(rows - w.size(0), cfg.dim)]) if w.size(0) < rows else w
    if embed == "dim":
        model.tok_embeddings, int8 = DimParallelEmbedding(read("tok_embeddings.weight")), False
    else:
        _, start, n = shard_of("tok_embeddings.weight", cfg, rank, world)
        w = pad(read("tok_embeddings.weight"))
        lookup = Int8Embedding(Int8Linear.from_float(w.float())) if int8 else nn.Embedding.from_pretrained(w)
        model.tok_embeddings = VocabParallelEmbedding(lookup, start, n)
    if cfg.tie_embeddings:
        out = model.tok_embeddings.lookup.table if int8 else model.tok_embeddings.lookup.weight
    else:
        w = pad(read("output.weight"))
        out = Int8Linear.from_float(w.float()) if int8 else nn.Parameter(w, requires_grad=False)
    if int8:
        model.output = out
        out.refine = OUTPUT_REFINE  # each rank recomputes its own best logits in fp32
    else:
        model.output = nn.Linear(cfg.dim, out.size(0), bias=False, device="meta")
        model.output.weight = out
    vocab = cfg.vocab_size
    model.output.register_forward_hook(lambda m, i, y: all_gather_last(y, vocab))


def _quantized_slice(name: str, source, read, shard, mode: str, group_size: int) -> nn.Module | None:
    """A projection's slice as an int4/int8 layer, or None to keep it float."""
    from .quantize import Int4Linear, Int8Linear
    if hasattr(source, "module"):  # GGUF blocks, repacked (requantized only for a mode the file's type does not have)
        return source.module(name, shard, mode, group_size)
    if mode == "auto":
        return None
    w = read(name).float()
    return Int4Linear.from_float(w, group_size) if mode == "int4" and w.size(1) % group_size == 0 else Int8Linear.from_float(w)


def parallelize(model: Transformer, rank: int, world: int, source=None, embed: str = "vocab",
                dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                quantize: str = "none", group_size: int = 32) -> Transformer:
    """Turn a built model (real or on the meta device) into rank `rank`'s shard of N = `world`, in place.

    Each weight becomes its slice, read from `source` (default: the model's own tensors); `attention`
    and `feed_forward` all-reduce their outputs, the embedding is vocab-parallel (or dim-parallel with
    embed='dim'), the output all-gathers the logits, and `model.config` names the rank's heads so that
    `setup_caches` makes a cache of n_kv_heads / N heads. Needs a process group (`init_tp`).

    quantize: 'none' keeps float projections; 'int8' / 'int4' quantize each rank's slices (as
    quantize_model does a whole model's); 'auto' repacks a GGUF file's quantized blocks slice by slice
    (as `load()` does) and keeps float checkpoints float. With quantized projections the embedding and
    output become one int8 table per rank, as in one process."""
    from .weights import expected_shapes
    cfg = model.config
    if getattr(model, "tp_world", 1) > 1:
        raise LlamaforgeError("this model is already split for tensor parallelism")
    if embed not in ("vocab", "dim") or (embed == "dim" and cfg.tie_embeddings):
        raise LlamaforgeError(f"embed must be 'vocab' or, for an untied model, 'dim'; got {embed!r}")
    odd = [n for n, m in model.named_modules() if n.endswith(COLUMN + ROW + ("output",)) and type(m) is not nn.Linear]
    if odd or type(model.tok_embeddings) is not nn.Embedding:
        raise LlamaforgeError("tensor parallelism splits float nn.Linear weights; this model has quantized or adapted "
                              f"layers ({(odd or ['tok_embeddings'])[0]}...): load it with quantize='none' and no adapter")
    if quantize not in ("auto", "none", "int8", "int4"):
        raise LlamaforgeError(f"unknown quantize mode {quantize!r}; use auto, none, int8 or int4")
    check_divisible(cfg, world, embed)
    source = source if source is not None else StateDictSource(model.state_dict())
    device = device or model.norm.weight.device
    if torch.device(device).type == "meta":
        device = "cpu"
    want = expected_shapes(cfg)
    model.clear_caches()

    def read(name: str) -> torch.Tensor:
        shard = shard_of(name, cfg, rank, world, embed)
        shape = list(want[name])
        if shard is not None:
            shape[shard[0]] = shard[2]
        try:
            t = source.read(name, shard)
        except KeyError:
            raise LlamaforgeError(f"the checkpoint has no tensor {name}: it is incomplete") from None
        if tuple(t.shape) != tuple(shape):
            raise LlamaforgeError(f"rank {rank}'s slice of {name} is {tuple(t.shape)}, expected {tuple(shape)}: "
                                  "the checkpoint is corrupt or does not match its config")
        dt = dtype or (t.dtype if t.is_floating_point() else torch.float32)
        # a slice of a larger tensor is copied, so that the rest can go; a tensor of its own (a Meta shard's
        # memory-mapped tensor, a slice already read) is kept as it is when its dtype and device fit
        whole = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        return t.to(device=device, dtype=dt, copy=not whole)

    for name in want:
        if name.startswith(("tok_embeddings", "output")):
            continue
        parent, _ = name.rsplit(".", 1)
        mod = model.get_submodule(parent)
        if isinstance(mod, nn.Linear) and quantize != "none":
            q = _quantized_slice(name, source, read, shard_of(name, cfg, rank, world), quantize, group_size)
            if q is not None:
                owner, attr = parent.rsplit(".", 1)
                model.get_submodule(owner).add_module(attr, q.to(device))
                continue
        w = read(name)
        mod.weight = nn.Parameter(w, requires_grad=False)
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = w.shape
    for layer in model.layers:
        layer.attention.n_heads, layer.attention.n_kv_heads = cfg.n_heads // world, cfg.n_kv_heads // world
        layer.attention.register_forward_hook(_all_reduce_hook)
        layer.feed_forward.register_forward_hook(_all_reduce_hook)

    quantized = getattr(source, "quantized", lambda name: False)  # GGUF: is it stored in blocks?
    int8_tables = quantize in ("int8", "int4") or (quantize == "auto" and quantized("tok_embeddings.weight"))
    _split_vocab(model, read, rank, world, embed, int8_tables)
    model.config = _local_config(cfg, world)
    model.tp_rank, model.tp_world, model.full_config = rank, world, cfg
    return model.eval()


# ---- rank 0 drives, the others follow ----

def _to(obj, device):
    """Tensors in nested args moved to `device` (CPU to travel between ranks, the rank's device after)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class _interrupts_after:
    """Hold Ctrl-C until the model call ends: rank 0 stopped between two collectives would leave the other
    ranks waiting in one. (Signals reach only the main thread; elsewhere this does nothing.)"""

    def __enter__(self):
        import signal
        self.hit, self.armed = False, threading.current_thread() is threading.main_thread()
        if self.armed:
            self.old = signal.signal(signal.SIGINT, lambda *_: setattr(self, "hit", True))

    def __exit__(self, *exc):
        import signal
        if self.armed:
            signal.signal(signal.SIGINT, self.old if self.old is not None else signal.default_int_handler)
            if self.hit and exc[0] is None:
                raise KeyboardInterrupt


class Leader:
    """Rank 0's model: each call (the model's, or a submodule's such as `output`) is broadcast to the other
    ranks before it runs here, so that they run it too (`follow`). `config` is the whole model's.
    Attribute reads pass through to the rank's model."""

    MIRRORED = ("forward", "setup_caches", "clear_caches", "copy_cache")

    def __init__(self, model: nn.Module, config: ModelConfig | None = None, path: str = "", lock=None):
        self._model, self._path = model, path
        self._lock = lock or threading.RLock()
        self.config = config if config is not None else getattr(model, "config", None)
        self.closed = False

    def _call(self, method: str, args, kwargs):
        with self._lock, _interrupts_after():
            if self.closed:
                raise LlamaforgeError("the tensor-parallel group has been closed")
            dist.broadcast_object_list([(self._path, method, _to(args, "cpu"), _to(kwargs, "cpu"))], src=0)
            fn = self._model if method == "__call__" else getattr(self._model, method)
            return fn(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._call("__call__", args, kwargs)

    def __getattr__(self, name: str):
        if name.startswith("_"):  # private and special names are the Leader's own
            raise AttributeError(name)
        if name in self.MIRRORED:
            return lambda *a, **k: self._call(name, a, k)
        if name in ("read_cache", "write_cache"):
            raise LlamaforgeError(f"{name} is not available with tensor parallelism (each rank caches its own heads)")
        attr = getattr(self._model, name)
        if isinstance(attr, nn.Module):  # its calls take part in collectives too
            return Leader(attr, None, f"{self._path}.{name}".lstrip("."), self._lock)
        return attr

    def close(self) -> None:
        """Tell the other ranks to stop following (once), and leave the process group."""
        with self._lock:
            if not self.closed and dist.is_initialized():
                self.closed = True
                dist.broadcast_object_list([None], src=0)
                dist.barrier()  # every rank has the message before the group goes
                dist.destroy_process_group()


def follow(model: nn.Module, device) -> int:
    """Run the calls rank 0's `Leader` broadcasts, in order, until it closes; returns the number of calls.
    Ctrl-C is rank 0's to handle (an interrupted chat answer goes on with the next line): ignored here."""
    import signal
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    calls = 0
    while True:
        msg = [None]
        dist.broadcast_object_list(msg, src=0)
        if msg[0] is None:
            dist.barrier()
            dist.destroy_process_group()
            return calls
        path, method, args, kwargs = msg[0]
        target = model.get_submodule(path) if path else model
        fn = target if method == "__call__" else getattr(target, method)
        with torch.no_grad():
            try:
                fn(*_to(args, device), **_to(kwargs, device))
            except Exception as e:  # rank 0 met the same error on the same input, before any collective
                print(f"llamaforge: rank {dist.get_rank()}: {type(e).__name__}: {e}", file=sys.stderr)
        calls += 1


# ---- loading ----

def open_source(fmt: str, path: Path, rank: int, world: int):
    """-> (config, source, embed style) of a checkpoint, reading headers only."""
    from .weights import check_shapes, config_from_hf, meta_config, read_json, read_safetensors, safetensors_files
    if fmt == "gguf":
        from .gguf import GGUFFile
        gf = GGUFFile(path)
        return gf.config(), GGUFSource(gf), "vocab"
    if fmt == "hf":
        cfg = config_from_hf(read_json(path / "config.json"), path / "config.json")
        files = safetensors_files(path)
        check_shapes(path, cfg, {k: shape for k, (_, shape, _) in read_safetensors(files, tensors=False).items()})
        return cfg, SafetensorsSource(files, cfg.head_dim), "vocab"
    params = read_json(path / "params.json")
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise LlamaforgeError(f"{path} has params.json but no consolidated.*.pth weight files")
    src = MetaSource(files, params.get("dim", -1), home=rank * len(files) // world)
    names = [k for k in src.shard(src.home) if k != "rope.freqs"]
    cfg = meta_config(path, params, {k: src.full_shape(k) for k in names})
    emb = src.part(src.home, "tok_embeddings.weight")
    column_split = src.split_dim("tok_embeddings.weight", emb) == 1
    embed = "dim" if column_split and cfg.dim % world == 0 else "vocab"
    return cfg, src, embed


def load_parallel(model: str | Path, tp: int, *, tokenizer: str | Path | None = None, chat_format: str | None = None,
                  device: str | None = None, dtype: torch.dtype | None = None, quantize: str = "auto", group_size: int = 32,
                  follow_now: bool = True):
    """Load rank RANK's slice of `model` (GGUF file, HF or Meta directory, or a named packaged model) in a
    torchrun group of `tp` processes; `quantize` as in `load()` (GGUF blocks stay int4/int8 by default, each
    rank repacking its own slices; the embedding and output are float). Rank 0 gets an `LLM` whose model is a `Leader`: use it as any LLM,
    and the other ranks run each model call with it. The other ranks follow rank 0's calls inside this
    function and get None once rank 0 is done (its process exits, or it calls `llm.model.close()`); with
    `follow_now=False` they get their split `Transformer` instead, to pass to `follow(model, device)`."""
    from .llm import LoadedWeights, find_tokenizer, resolve, wrap_model
    rank, dev = init_tp(tp, device)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    fmt, path = resolve(model)
    cfg, source, embed = open_source(fmt, path, rank, tp)
    if not cfg.name:
        cfg.name = path.stem
    with torch.device("meta"):
        net = Transformer(cfg)
    parallelize(net, rank, tp, source, embed, dtype, dev, quantize, group_size)
    gf, source = getattr(source, "gf", None), None
    if rank > 0:
        if not follow_now:
            return net
        follow(net, dev)
        return None
    tok, template = find_tokenizer(fmt, path, tokenizer, gf, cfg)
    leader = Leader(net, cfg)
    atexit.register(leader.close)
    return wrap_model(leader, LoadedWeights(fmt, path, cfg, {}, tok, template), chat_format)
