"""Training checkpoints: atomic, complete (model, optimizer, schedule, data position, RNG), resharding.

A checkpoint is a directory `run/ckpt/step_<N>/`, written under a temporary name and renamed
into place (`weights.atomic_dir`), so a crash or `kill -9` never leaves a half-written one:
  model.safetensors    full fp32 weights, our (Meta) names, interleaved RoPE layout
  model_config.json    the ModelConfig (litgpt `model_config.yaml`, Meta `params.json`)
  tokenizer.model|json the tokenizer the data was prepared with
  train_state.pt       optimizer state keyed by parameter name, step, data position, RNG states,
                       elapsed time (loaded with weights_only=True: no pickled code runs)
State dicts are gathered whole (torch.distributed.checkpoint.state_dict, `full_state_dict=True`)
and every rank loads the whole files and keeps its shard, so a checkpoint written by N processes
resumes on M. `run/model/` mirrors the latest checkpoint as a Hugging Face directory
(`weights.save_hf`), which `llamaforge.load`, chat, generate, convert and transformers read.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import LlamaforgeError
from .parallelize import Dist, barrier
from ..weights import atomic_dir, remove_stale_temporaries, save_hf

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoints(run: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first (temporary directories start with '.' and are ignored;
    those of a process killed while writing, in ckpt/ and beside model/, are removed: a run that starts
    or resumes after a kill -9 leaves none behind)."""
    remove_stale_temporaries(Path(run), "model")
    remove_stale_temporaries(Path(run) / "ckpt", r"step_\d+")
    root = Path(run) / "ckpt"
    found = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run: str | Path) -> Path | None:
    found = checkpoints(run)
    return found[-1][1] if found else None


def rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": np_state["state"]["pos"],
                      "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]}}


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if st["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    v, state, gauss = st["python"]
    random.setstate((v, tuple(state), gauss))
    n = st["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})


def full_state_dicts(model, optimizer) -> tuple[dict, dict]:
    """Whole (unsharded) model and optimizer state dicts on the CPU, keyed by parameter name. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def save_checkpoint(run: str | Path, step: int, model, optimizer, cfg: ModelConfig, tokenizer, train_state: dict,
                    d: Dist, keep: int = 3, trainable_only: bool = False, export=None, chat_template: str | None = None) -> Path | None:
    """Gather the state (all ranks), write it atomically (rank 0), export run/model/, keep the last `keep`.

    `trainable_only` keeps just the parameters that train (a LoRA adapter, not its frozen base);
    `export(state_dict)` replaces the run/model/ export (fine-tuning writes its adapter files instead)."""
    from safetensors.torch import save_file
    msd, osd = full_state_dicts(model, optimizer)
    if trainable_only:
        names = {n.replace("_checkpoint_wrapped_module.", "") for n, p in model.named_parameters() if p.requires_grad}
        msd = {k: v for k, v in msd.items() if k in names}
    dst = Path(run) / "ckpt" / f"step_{step:08d}"
    if d.is_main:
        weights = {k: v.contiguous() for k, v in msd.items() if not (cfg.tie_embeddings and k == "output.weight")}
        with atomic_dir(dst) as tmp:
            tmp.chmod(0o755)  # mkdtemp makes it 0700
            save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt", "step": str(step)})
            cfg.save(tmp / "model_config.json")
            if tokenizer is not None:
                tokenizer.save(tmp)
            torch.save({"optimizer": osd, "train": {**train_state, "rng": rng_state()}}, tmp / "train_state.pt")
        if export is not None:
            export(msd)
        else:
            export_model(Path(run) / "model", cfg, msd, tokenizer, chat_template)
        for _, old in checkpoints(run)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(d)
    return dst if d.is_main else None


def export_model(dst: Path, cfg: ModelConfig, state_dict: dict, tokenizer, chat_template: str | None = None) -> None:
    """run/model/: a Hugging Face directory of the latest weights (what load(), chat, convert and transformers read)."""
    save_hf(dst, cfg, state_dict, tokenizer, chat_template)
    dst.chmod(0o755)  # atomic_dir's mkdtemp makes it 0700
    tc_path = dst / "tokenizer_config.json"
    if getattr(tokenizer, "kind", None) == "sentencepiece" and tc_path.exists():
        # Without tokenizer_class, transformers 5 builds a generic tokenizer that skips SentencePiece's
        # dummy prefix ("To" instead of "▁To"); LlamaTokenizer matches sentencepiece exactly.
        # (Belongs in weights.save_hf; kept here until it moves there.)
        tc = json.loads(tc_path.read_text())
        tc.setdefault("tokenizer_class", "LlamaTokenizer")
        tmp = tc_path.with_name(".tokenizer_config.json.tmp")
        tmp.write_text(json.dumps(tc, indent=2) + "\n")
        tmp.replace(tc_path)


def load_checkpoint(path: str | Path, model, optimizer, cfg: ModelConfig, trainable_only: bool = False) -> dict:
    """Load weights and optimizer state into a (possibly sharded) model; restore RNG; return the train state.
    `trainable_only`: the checkpoint holds only the trained parameters (see `save_checkpoint`)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    path = Path(path)
    saved = ModelConfig.load(path / "model_config.json")
    if saved.to_dict() | {"name": ""} != cfg.to_dict() | {"name": ""}:
        diff = {k: (v, cfg.to_dict().get(k)) for k, v in saved.to_dict().items() if cfg.to_dict().get(k) != v and k != "name"}
        raise LlamaforgeError(f"{path} was trained with a different model config (checkpoint vs now: {diff}): "
                              "resume with the same --config and model flags")
    sd = load_file(str(path / "model.safetensors"))
    if cfg.tie_embeddings and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    opts = StateDictOptions(full_state_dict=True, strict=not trainable_only)
    set_model_state_dict(model, sd, options=opts)
    st = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer, st["optimizer"], options=opts)
    set_rng_state(st["train"]["rng"])
    return st["train"]
