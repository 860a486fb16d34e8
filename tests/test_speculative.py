"""Speculative decoding is exact: greedy output equals plain greedy (n-gram and draft-model drafters, with
a constraint too), and sampled output keeps the model's distribution (the acceptance rule on a toy chain)."""
import collections
import math

import pytest
import torch

from llamaforge.generate import SamplingConfig, generate
from llamaforge.model import Transformer
from llamaforge.speculative import Drafter, DraftModel, PromptLookup, common_prefix, speculate, verify

from conftest import OnlyEven, needs_default_model


@pytest.fixture
def model(tiny_config):
    m = Transformer(tiny_config).eval()
    m.init_weights(std=0.2)
    return m


REPEAT = [5, 17, 42, 8, 9, 10, 11, 12, 13, 5, 17, 42, 8, 9, 10, 11, 5, 17]


class Oracle(Drafter):
    """Proposes the plain greedy continuation with every `wrong`-th token replaced: long drafts, some cut short."""

    def __init__(self, prompt, answer, wrong=3, max_tokens=6):
        self.seq, self.T, self.wrong, self.max_tokens, self.calls = prompt + answer, len(prompt), wrong, max_tokens, 0

    def propose(self, ids, n):
        self.calls += 1
        out = self.seq[len(ids):len(ids) + n]
        return [(t + 1) % 512 if (len(ids) + i) % self.wrong == 0 else t for i, t in enumerate(out)]


def test_prompt_lookup_proposes_what_followed_the_last_ngram():
    d = PromptLookup(max_tokens=4, ngram=3, min_ngram=2)
    d.start([])
    assert d.propose([1, 2, 3, 4, 5, 9, 9, 1, 2, 3], 4) == [4, 5, 9, 9]
    assert d.propose([1, 2, 3, 4, 5, 9, 9, 1, 2, 3, 7, 2, 3], 4) == [7, 2, 3]  # the latest occurrence wins
    assert d.propose([1, 2, 3, 4, 5], 4) == []
    assert d.propose([6, 1, 6, 1, 6], 2) == [1, 6]  # a fresh context is indexed again
    ctx = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3]
    d.kept(4, 0)  # a miss: the next lookup is skipped
    assert d.propose(ctx, 4) == [] and d.propose(ctx, 4) == [4, 5]  # and the draft is shorter
    d.kept(2, 0)
    d.kept(2, 0)  # a second miss in a row: 2 lookups skipped... a third: 4
    assert [d.propose(ctx, 4) for _ in range(5)] == [[], [], [], [], [4, 5]]
    d.kept(2, 2)  # a hit ends the pause and lengthens the draft
    assert d.propose(ctx, 4) == [4, 5, 9, 9]
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix([], [1]) == 0 and common_prefix([1, 2], [1, 2, 3]) == 2


def test_greedy_speculation_equals_plain_greedy(model, tiny_config):
    cfg = SamplingConfig(temperature=0, max_new_tokens=40)
    plain = list(generate(model, REPEAT, cfg))
    assert list(generate(model, REPEAT, cfg, draft=PromptLookup())) == plain
    same = Transformer(tiny_config).eval()
    same.load_state_dict(model.state_dict())  # a draft that agrees: every draft is kept
    assert list(generate(model, REPEAT, cfg, draft=DraftModel(same))) == plain
    other = Transformer(tiny_config).eval()
    other.init_weights(std=0.2)  # a draft that mostly disagrees: every draft is cut
    assert list(generate(model, REPEAT, cfg, draft=DraftModel(other))) == plain
    oracle = Oracle(REPEAT, plain)
    assert list(generate(model, REPEAT, cfg, draft=oracle)) == plain and oracle.calls < 25
    # stop ids and the token budget end a run inside a draft
    stop = {plain[7]}
    assert list(generate(model, REPEAT, cfg, stop, draft=Oracle(REPEAT, plain, wrong=100))) == plain[:8]
    short = SamplingConfig(temperature=0, max_new_tokens=5)
    assert list(generate(model, REPEAT, short, draft=Oracle(REPEAT, plain, wrong=100))) == plain[:5]


def test_speculation_goes_through_constraints_and_penalties(model):
    cfg = SamplingConfig(temperature=0, max_new_tokens=30)
    plain = list(generate(model, REPEAT, cfg, constraint=OnlyEven(12)))
    assert len(plain) == 12 and all(t % 2 == 0 for t in plain)
    oracle = Oracle(REPEAT, plain, wrong=4)
    assert list(generate(model, REPEAT, cfg, constraint=OnlyEven(12), draft=oracle)) == plain
    pen = SamplingConfig(temperature=0, max_new_tokens=30, repetition_penalty=1.3, logit_bias={7: 2.0})
    plain = list(generate(model, REPEAT, pen))
    assert list(generate(model, REPEAT, pen, draft=Oracle(REPEAT, plain))) == plain


def test_acceptance_rule_keeps_the_distribution():
    """verify() alone: the kept token is distributed as p, whichever token was drafted."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    p = torch.softmax(logits, -1)[0]
    cfg = SamplingConfig(temperature=1.0, top_p=1.0)
    gen = torch.Generator().manual_seed(1)
    N = 4000
    for draft in (0, 3):
        counts = collections.Counter(verify(logits, draft, cfg, gen, None, None, 10) for _ in range(N))
        for t in range(5):
            sd = math.sqrt(p[t] * (1 - p[t]) / N)
            assert abs(counts[t] / N - p[t]) < 4.5 * sd + 1e-3, (draft, t, counts)


class Chain(torch.nn.Module):
    """A toy 'model': the next token's logits depend only on the current token (a Markov chain)."""

    def __init__(self, logits):
        super().__init__()
        self.table = torch.nn.Parameter(logits, requires_grad=False)
        self.max_seq_len = 64

    def forward(self, tokens, input_pos=None, **kw):
        return self.table[tokens]  # (B, T, vocab)


class Guess(Drafter):
    """Always drafts the same tokens: often wrong, sometimes right."""
    max_tokens = 3

    def propose(self, ids, n):
        return [1, 2, 0][:n]


def test_sampled_speculation_keeps_the_chain_distribution():
    """Whole runs of three tokens through `speculate`: their frequencies match the chain's probabilities."""
    torch.manual_seed(0)
    table = torch.randn(3, 3)
    chain = Chain(table)
    probs = torch.softmax(table, -1)
    cfg = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=3)
    gen = torch.Generator().manual_seed(3)
    N = 3000
    counts = collections.Counter()
    for _ in range(N):
        logits = chain.table[0:1]  # after the prompt [0]
        run = speculate(chain, logits, torch.tensor([[0]]), cfg, gen, set(), lambda m, t, p: m(t, p)[:, -1], None, 3, Guess())
        counts[tuple(run)] += 1
    for seq, n in counts.items():
        p, prev = 1.0, 0
        for t in seq:
            p, prev = p * float(probs[prev, t]), t
        sd = math.sqrt(p * (1 - p) / N)
        assert abs(n / N - p) < 4.5 * sd + 2e-3, (seq, n / N, p)
    assert sum(counts.values()) == N and len(counts) > 15


@needs_default_model
def test_default_model_greedy_speculation_is_exact(default_llm_q):
    llm = default_llm_q
    text = ("Repeat this passage exactly: The quick brown fox jumps over the lazy dog. The quick brown fox jumps over "
            "the lazy dog, and then it runs into the forest.")
    ids = llm.chat_ids([{"role": "user", "content": text}])
    cfg = SamplingConfig(temperature=0, max_new_tokens=40)
    plain = list(generate(llm.model, ids, cfg, llm.tokenizer.stop_ids))
    spec = list(generate(llm.model, ids, cfg, llm.tokenizer.stop_ids, draft=PromptLookup()))
    assert spec == plain
