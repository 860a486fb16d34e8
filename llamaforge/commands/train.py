"""`llamaforge tokenizer train | prepare | pretrain | finetune | dpo | merge`: data, pretraining, adaptation."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from ..errors import LlamaforgeError
from ..llm import DEFAULT_MODEL
from .common import add_config_flags, add_threads_flag, config_from_args, set_threads


def cmd_tokenizer_train(args) -> None:
    from ..training.data import expand, train_tokenizer
    files = [f for pattern in args.files for f in expand(pattern)]
    t0 = time.perf_counter()
    tok = train_tokenizer(files, args.out, args.vocab_size, threads=args.threads)
    sample = "To be, or not to be: 1603."
    pieces = [tok.id_to_piece(i) for i in tok.encode(sample, bos=False)]
    print(f"wrote {Path(args.out) / 'tokenizer.model'}: {tok.vocab_size} pieces from {len(files)} files "
          f"in {time.perf_counter() - t0:.1f}s; {sample!r} -> {pieces}", file=sys.stderr)


def cmd_prepare(args) -> None:
    from ..training.data import parse_sources, prepare
    meta = prepare(parse_sources(args.sources), args.tokenizer, args.out, args.val_fraction, int(args.shard_mb * 2 ** 20))
    total = sum(s["n_train"] for s in meta["sources"])
    print(f"wrote {args.out}/meta.json: {total:,} train tokens in {len(meta['sources'])} sources", file=sys.stderr)


def _exit_if_signalled(report: dict) -> None:
    if report.get("stopped_by") in ("SIGTERM", "SIGINT"):
        raise SystemExit(128 + signal.Signals[report["stopped_by"]].value)


def cmd_pretrain(args) -> None:
    import torch

    from ..training.pretrain import TrainConfig, train
    set_threads(args, quiet=True)  # the run's header line says what was chosen
    tc = config_from_args(args, TrainConfig)
    try:
        report = train(tc)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    _exit_if_signalled(report)


def cmd_finetune(args, dpo: bool) -> None:
    from ..training.finetune import DPOConfig, FinetuneConfig, finetune
    set_threads(args, quiet=True)  # the run's header line says what was chosen
    fc = config_from_args(args, DPOConfig if dpo else FinetuneConfig)
    _exit_if_signalled(finetune(fc, dpo=dpo))


def cmd_merge(args) -> None:
    from ..training.finetune import merge
    if os.path.abspath(args.out) == os.path.abspath(args.model):
        raise LlamaforgeError("merge would overwrite its base model: choose another --out")
    merge(args.model, args.adapter, args.out, args.to, args.dtype)
    print(f"wrote {args.out} ({args.to}): {args.model} with {args.adapter} merged in", file=sys.stderr)


def add_commands(sub) -> None:
    from ..training.data import SHARD_BYTES
    from ..training.finetune import DPOConfig, FinetuneConfig
    from ..training.pretrain import TrainConfig
    t = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = t.add_subparsers(dest="tokenizer_command", required=True)
    tt = tsub.add_parser("train", help="train a LLaMA-style BPE tokenizer (SentencePiece, byte fallback, split digits)")
    tt.add_argument("files", nargs="+", help="text files, directories or globs")
    tt.add_argument("--vocab-size", type=int, required=True, help="number of pieces (LLaMA: 32000)")
    tt.add_argument("--out", required=True, help="output directory (gets tokenizer.model)")
    tt.add_argument("--threads", type=int, default=None)
    tt.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("prepare", help="tokenize sources into memory-mapped train/val shards")
    p.add_argument("sources", nargs="+", help="[NAME=]PATH[:WEIGHT]: file, directory or glob, with its sampling weight")
    p.add_argument("--tokenizer", required=True, help="directory or file of the tokenizer")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--val-fraction", type=float, default=0.005, help="share of each shard's tokens held out (default 0.005)")
    p.add_argument("--shard-mb", type=float, default=SHARD_BYTES / 2 ** 20, help="input MB per shard (default 64)")
    p.set_defaults(func=cmd_prepare)

    r = sub.add_parser("pretrain", help="pretrain a LLaMA from scratch (LLaMA recipe; torchrun for several processes)")
    add_config_flags(r, TrainConfig)
    add_threads_flag(r)
    r.set_defaults(func=cmd_pretrain)

    for name, cls, dpo, help in (("finetune", FinetuneConfig, False, "supervised fine-tuning: full, LoRA or QLoRA"),
                                 ("dpo", DPOConfig, True, "Direct Preference Optimization of a LoRA adapter (prompt/chosen/rejected)")):
        f = sub.add_parser(name, help=help)
        add_config_flags(f, cls)
        add_threads_flag(f)
        f.set_defaults(func=lambda args, dpo=dpo: cmd_finetune(args, dpo))

    m = sub.add_parser("merge", help="fold a LoRA adapter into its base model and write an HF directory or GGUF file")
    m.add_argument("--model", "-m", default=DEFAULT_MODEL, help="the adapter's base model")
    m.add_argument("--adapter", required=True, help="adapter directory (finetune output or PEFT layout)")
    m.add_argument("--out", required=True, help="output directory (hf) or .gguf file")
    m.add_argument("--to", default="hf", choices=["hf", "gguf"])
    m.add_argument("--dtype", default=None, help="hf: f32|f16|bf16 (default f32); gguf: f32|f16|bf16|q8_0|q4_0|q4_1 (default f16)")
    m.set_defaults(func=cmd_merge)
