"""A `llamaforge` model type for EleutherAI's lm-evaluation-harness, so any lm-eval task runs on our models.

    python -m llamaforge.lm_eval_bridge --model llamaforge --model_args model=M,quantize=none --tasks hellaswag
    # or, in Python:
    import llamaforge.lm_eval_bridge, lm_eval
    lm_eval.simple_evaluate(model="llamaforge", model_args="model=M", tasks=[...])

lm-eval 0.4 has no plugin discovery for model types (its registry is filled by imports), so the
`lm_eval` command itself knows `llamaforge` only once this module is imported; running this
module does that and then hands its arguments to lm-eval's own CLI.

Requests go through `scoring.py`: loglikelihood requests with the same context are packed as one
prefix tree (the context runs once for all of an item's choices), loglikelihood_rolling uses
lm-eval's disjoint rolling windows of the model's context, generate_until decodes greedily in
batches. Tokenization is lm-eval's own (`TemplateLM._encode_pair`); contexts longer than the
model's window are cut on the left, as lm-eval's HF model does, and counted in a warning.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from ..errors import require

require("lm_eval", "the lm-eval bridge")
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402

log = logging.getLogger(__name__)


@register_model("llamaforge")
class LlamaforgeLM(TemplateLM):
    def __init__(self, model: str | None = None, tokenizer: str | None = None, quantize: str = "none",
                 device: str | None = None, batch_size=None, max_batch_size=None, batch_tokens: int = 4096,
                 threads: int | None = None, max_gen_toks: int = 256, llm=None, **kwargs):
        super().__init__()
        import torch

        from ..llm import DEFAULT_MODEL, load
        if threads:
            torch.set_num_threads(int(threads))
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            log.warning("llamaforge: device %s is not available (lm-eval's default is cuda); using the CPU", device)
            device = "cpu"
        self.llm = llm or load(model or DEFAULT_MODEL, tokenizer=tokenizer, device=device, quantize=quantize)
        if self.llm.tokenizer is None:
            raise ValueError("the model has no tokenizer: pass model_args tokenizer=PATH")
        self.tok = self.llm.tokenizer
        self.batch_tokens = int(batch_tokens)
        bs = batch_size if batch_size not in (None, "auto") and not str(batch_size).startswith("auto") else None
        self.batch_size_items = int(bs) if bs is not None else None
        self.max_gen_toks = int(max_gen_toks)
        self.truncated = 0

    # ---- what TemplateLM needs ----
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id if self.tok.eos_id is not None else self.tok.bos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.llm.config.max_seq_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string, bos=add_special_tokens)

    def tok_decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    @property
    def tokenizer_name(self) -> str:
        return f"llamaforge-{self.tok.kind}-{self.tok.vocab_size}"

    def _fit(self, ctx: list[int], cont: list[int]):
        """Request over the last max_length + 1 tokens (the last one is only a target)."""
        from .scoring import Request
        tokens, start = ctx + cont, len(ctx)
        cut = max(0, len(tokens) - 1 - self.max_length)
        if cut:
            self.truncated += 1
            tokens, start = tokens[cut:], max(1, start - cut)
        return Request(tokens, start)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        from .scoring import score_groups
        by_ctx: dict[tuple[int, ...], list[int]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            by_ctx.setdefault(tuple(ctx), []).append(i)  # same context: one prefix tree
        keys = list(by_ctx)
        groups = [[self._fit(list(k), requests[i][2]) for i in by_ctx[k]] for k in keys]
        scores = score_groups(self.llm.model, groups, self.batch_tokens, self.batch_size_items)
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for k, ss in zip(keys, scores):
            for i, s in zip(by_ctx[k], ss):
                out[i] = (s.logprob, s.greedy)
                if self.cache_hook is not None and requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        self._warn_truncated()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        from .scoring import Request, score_groups
        groups, owner = [], []
        for j, req in enumerate(requests):
            windows = get_rolling_token_windows(self.tok_encode(req.args[0], add_special_tokens=False),
                                                self.prefix_token_id, self.max_length, 1)
            for ctx, pred in map(make_disjoint_window, windows):
                groups.append([Request(ctx + pred, len(ctx))])
                owner.append(j)
        totals = [0.0] * len(requests)
        for j, ss in zip(owner, score_groups(self.llm.model, groups, self.batch_tokens, self.batch_size_items)):
            totals[j] += ss[0].logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from .scoring import generate_greedy
        out: list[str] = [""] * len(requests)
        by_kwargs: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            by_kwargs.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        stop_ids = set(self.tok.stop_ids)
        for idx in by_kwargs.values():
            kw = dict(requests[idx[0]].args[1])
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if kw.get("do_sample") or kw.get("temperature", 0) > 0:
                log.warning("llamaforge: sampling was asked (%s); lm-eval results are reported greedy", kw)
            n_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            prompts = []
            for i in idx:
                ids = self.tok_encode(requests[i].args[0])
                keep = self.max_length - n_new
                if len(ids) > keep:
                    self.truncated += 1
                    ids = ids[-keep:]
                prompts.append(ids)

            def is_done(new: list[int]) -> bool:
                return new[-1] in stop_ids or any(s in self.tok.decode(new) for s in until)

            gens = generate_greedy(self.llm.model, prompts, n_new, is_done, self.batch_tokens, self.batch_size_items or 64)
            for i, new in zip(idx, gens):
                text = self.tok.decode([t for t in new if t not in stop_ids])
                for s in until:
                    text = text.split(s)[0]
                out[i] = text
                if self.cache_hook is not None:
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        self._warn_truncated()
        return out

    def _warn_truncated(self) -> None:
        if self.truncated:
            log.warning("llamaforge: %d requests were longer than the model's context (%d tokens) and were cut on the left",
                        self.truncated, self.max_length)
            self.truncated = 0


TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"  # the LLaMA paper's tasks on offline data, lm-eval's prompts


def main() -> None:
    """lm-eval's CLI, with the `llamaforge` model type registered and, unless --include_path says
    otherwise, our offline task configs (they take precedence over lm-eval's own, which reach for the Hub)."""
    from lm_eval.__main__ import cli_evaluate
    if "--include_path" not in sys.argv and any(a in ("--tasks", "-t") or a.startswith("--tasks=") for a in sys.argv):
        sys.argv += ["--include_path", str(TASKS_DIR)]
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    sys.exit(cli_evaluate())


if __name__ == "__main__":
    main()
