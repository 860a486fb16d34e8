"""`llamaforge reward train | score`, `rejection-sample`, `gatt`: the rest of the Llama 2-Chat recipe
(reward model, rejection-sampling fine-tuning, Ghost Attention data); SFT and DPO live in train.py."""
from __future__ import annotations

import json
import sys

from ..errors import LlamaforgeError
from .common import add_config_flags, add_sampling_flags, add_threads_flag, config_from_args, sampling_kwargs, set_threads


def cmd_reward_train(args) -> None:
    from ..training.reward import RewardConfig, train_reward
    set_threads(args)
    train_reward(config_from_args(args, RewardConfig))


def cmd_reward_score(args) -> None:
    from ..training.reward import load_pairs, load_reward_model, pair_accuracy, score
    set_threads(args)
    if bool(args.data) == bool(args.prompt):
        raise LlamaforgeError("pass --data PAIRS.jsonl (pair accuracy) or --prompt TEXT with --answer (scores), not both")
    rm, llm = load_reward_model(args.reward, chat_format=args.chat_format)
    if args.prompt:
        if not args.answer:
            raise LlamaforgeError("pass one --answer or more to score against --prompt")
        for a, r in zip(args.answer, score(rm, llm, args.prompt, args.answer)):
            print(f"{r:+.4f}\t{a}")
        return
    tok = llm.tokenizer
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    pairs = load_pairs(args.data, tok, llm.chat_format, llm.chat_format_error, llm.config.max_seq_len, "stop", pad)
    res = pair_accuracy(rm, pairs)
    print(json.dumps(res) if args.json else f"{res['pairs']} pairs: accuracy {100 * res['accuracy']:.1f}%, "
          f"mean loss {res['loss']:.4f}, mean reward gap (chosen - rejected) {res['reward_gap']:+.3f}")


def cmd_rejection_sample(args) -> None:
    from ..training.rejection import RejectionConfig, rejection_sample
    set_threads(args)
    rejection_sample(config_from_args(args, RejectionConfig))


def cmd_gatt(args) -> None:
    from ..training.gatt import build
    set_threads(args)
    llm = None
    if args.model:
        from .common import load_llm
        llm = load_llm(args)
    res = build(args.data, args.out, args.instruction, args.turns, llm, **sampling_kwargs(args))
    print(f"wrote {args.out}: {res['examples']} GAtt examples from {res['dialogs']} dialogs "
          f"({'answers sampled with the instruction on every turn' if res['sampled'] else 'answers as given'})",
          file=sys.stderr)


def add_commands(sub) -> None:
    from ..training.reward import RewardConfig
    from ..training.rejection import RejectionConfig
    r = sub.add_parser("reward", help="reward models: a LLaMA trunk with a scalar head on preference pairs (Llama 2)")
    rsub = r.add_subparsers(dest="reward_command", required=True)
    jobs = [(rsub, "train", "train on prompt/chosen/rejected(/margin) lines with the binary ranking loss", RewardConfig,
             cmd_reward_train),
            (sub, "rejection-sample", "sample K answers per prompt, keep the reward model's best, fine-tune on it",
             RejectionConfig, cmd_rejection_sample)]
    for parent, name, help, cls, func in jobs:
        j = parent.add_parser(name, help=help)
        add_config_flags(j, cls)
        add_threads_flag(j)
        j.set_defaults(func=func)
    s = rsub.add_parser("score", help="held-out pair accuracy (--data) or the rewards of answers (--prompt, --answer)")
    s.add_argument("--reward", required=True, help="reward model directory (`reward train` output)")
    s.add_argument("--data", default=None, help="preference JSONL: accuracy = share of pairs ranked as labelled")
    s.add_argument("--prompt", default=None, help="a user prompt to score answers to")
    s.add_argument("--answer", action="append", default=None, help="an answer to score (repeatable)")
    s.add_argument("--chat-format", default=None, choices=["template", "chatml", "llama2", "llama3"], help="override the chat format")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    add_threads_flag(s)
    s.set_defaults(func=cmd_reward_score)

    g = sub.add_parser("gatt", help="Ghost Attention data: a multi-turn chat set + an instruction -> SFT lines (Llama 2)")
    g.add_argument("--data", required=True, help="dialog JSONL: {'messages': [...], 'instruction'?: ...} per line")
    g.add_argument("--instruction", default="", help="the instruction for lines without their own, e.g. 'Always answer as a pirate.'")
    g.add_argument("--out", required=True, help="output JSONL for `llamaforge finetune`")
    g.add_argument("--turns", default="all", choices=["all", "last"], help="an example per assistant turn (all) or per dialog (last)")
    g.add_argument("--model", "-m", default=None, help="sample the answers from this model with the instruction on every turn "
                   "(default: keep the dialogs' own answers)")
    for flag, kw in (("--tokenizer", {}), ("--chat-format", {"choices": ["template", "chatml", "llama2", "llama3"]}),
                     ("--device", {})):
        g.add_argument(flag, default=None, **kw)
    add_sampling_flags(g)
    add_threads_flag(g)
    g.set_defaults(func=cmd_gatt)
