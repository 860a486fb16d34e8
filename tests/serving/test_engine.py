"""The continuous-batching engine on a tiny random model: every sequence, whatever joined or left
the batch around it, gets the tokens it would get alone (greedy: the argmax of a cache-free
forward at every step; seeded sampling: the same draws), and cancel, timeout, stop ids, the
waiting-line limit and jobs behave."""
import threading
import time

import pytest
import torch

from llamaforge import LlamaforgeError, ModelConfig, SamplingConfig
from llamaforge.serving.engine import Engine, QueueFull, Sequence
from llamaforge.model import Transformer

from conftest import OnlyEven

TIE = 1e-4  # two logits this close are a tie: either token is a correct greedy choice


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_name("tiny"))  # dim 64, 2 layers, GQA 4/2, vocab 512, context 256
    m.init_weights(std=0.1)
    return m.eval()


def greedy(n: int, **kw) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=n, temperature=0.0, **kw)


def check_greedy(model, prompt: list[int], out: list[int]) -> None:
    """Each output token is the argmax (up to a tie) of the full forward over prompt + output."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out]))[0]
    for i, t in enumerate(out):
        row = logits[len(prompt) - 1 + i]
        assert row.max() - row[t] <= TIE, (i, t, int(row.argmax()))


def run(engine: Engine, seqs: list[Sequence]) -> list[list[int]]:
    for s in seqs:
        engine.submit(s)
    engine.start()
    return [[step.token for step in s] for s in seqs]


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def test_batched_greedy_equals_alone_with_joins_and_leaves(model):
    # 7 sequences through 3 rows: as each finishes (different lengths) a waiting one joins, so rows
    # move around; every output must still be what the sequence decodes alone
    ps = prompts(7)
    lengths = [5, 17, 9, 30, 1, 12, 23]
    engine = Engine(model, max_batch=3, max_seq_len=128)
    try:
        seqs = [Sequence(p, greedy(n)) for p, n in zip(ps, lengths)]
        outs = run(engine, seqs)
    finally:
        engine.stop()
    for p, n, s, out in zip(ps, lengths, seqs, outs):
        assert len(out) == n and s.tokens == out and s.finish_reason == "length"
        check_greedy(model, p, out)
    assert max(engine.batch_sizes) == 3 and engine.stats["prompt_tokens"] == sum(map(len, ps))


def test_requests_join_a_running_batch(model):
    # While one sequence decodes, hold the engine thread with a job, queue several prompts of
    # different lengths, let go: they are prefilled together (left-padded) into rows that the
    # running sequence had to leave, then all decode in one batch
    engine = Engine(model, max_batch=6, max_seq_len=256).start()
    try:
        first = engine.submit(Sequence(prompts(1, seed=5)[0], greedy(150)))
        it = iter(first)
        for _ in range(10):
            next(it)  # first is decoding
        late = []
        for n_late in (4, 1):  # k > n running, then k < n running
            inside, gate = threading.Event(), threading.Event()
            engine.call(lambda: (inside.set(), gate.wait(10)))
            assert inside.wait(10)  # the engine thread is held between two steps
            late += [engine.submit(Sequence(p, greedy(20 + 5 * i))) for i, p in enumerate(prompts(n_late, seed=6 + n_late))]
            gate.set()
            for _ in range(500):  # bounded: until the group has been admitted
                if engine.load[1] == 0:
                    break
                time.sleep(0.01)
        outs = [[st.token for st in s] for s in late]
        rest = [st.token for st in it]
    finally:
        engine.stop()
    assert len(first.tokens) == 150 and len(rest) == 140
    assert engine.stats["prefills"] == 3 and max(engine.batch_sizes) == 6  # grouped prefills, one batch
    check_greedy(model, first.prompt, first.tokens)
    for s, out in zip(late, outs):
        assert len(out) == s.sampling.max_new_tokens
        check_greedy(model, s.prompt, out)


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    p = prompts(1, seed=3)[0]
    cfg = SamplingConfig(max_new_tokens=25, temperature=0.9, top_p=0.95, seed=1234)
    alone = Engine(model, max_batch=1, max_seq_len=128)
    try:
        want = run(alone, [Sequence(p, cfg)])[0]
    finally:
        alone.stop()
    engine = Engine(model, max_batch=4, max_seq_len=128)
    try:
        others = [Sequence(q, SamplingConfig(max_new_tokens=25, temperature=1.0, seed=i)) for i, q in enumerate(prompts(3, seed=4))]
        outs = run(engine, [others[0], Sequence(p, cfg), *others[1:]])
    finally:
        engine.stop()
    assert outs[1] == want
    assert len({tuple(o) for o in outs}) == 4


def test_stop_ids_end_a_sequence_without_reporting_the_stop_token(model):
    p = prompts(1, seed=8)[0]
    engine = Engine(model, max_batch=2, max_seq_len=128)
    try:
        ref = run(engine, [Sequence(p, greedy(12))])[0]
        k = max(i for i in range(len(ref)) if ref[i] not in ref[:i])  # a token's first occurrence
        seq = engine.submit(Sequence(p, greedy(12), stop_ids={ref[k]}))
        out = [st.token for st in seq]
    finally:
        engine.stop()
    assert out == ref[:k] and seq.finish_reason == "stop"


def test_cancel_and_timeout_free_their_rows(model):
    engine = Engine(model, max_batch=2, max_seq_len=256).start()
    slow = model.register_forward_pre_hook(lambda *_: time.sleep(0.005))  # >= 1 s to the end of the context
    try:
        a = engine.submit(Sequence(prompts(1)[0], greedy(10_000)))
        b = engine.submit(Sequence(prompts(1, seed=2)[0], greedy(10_000), timeout=0.05))
        it = iter(a)
        next(it)
        a.cancel()
        rest_a = list(it)
        rest_b = list(b)
        c = engine.submit(Sequence(prompts(1, seed=3)[0], greedy(4)))
        assert len(list(c)) == 4
    finally:
        slow.remove()
        engine.stop()
    assert a.finish_reason == "cancelled" and len(a.tokens) == 1 + len(rest_a) < 200
    assert b.finish_reason in ("timeout", "length") and len(rest_b) == len(b.tokens)
    assert engine.load == (0, 0)


def test_context_window_ends_a_sequence(model):
    engine = Engine(model, max_batch=2, max_seq_len=32).start()
    try:
        seq = engine.submit(Sequence(list(range(20)), greedy(100)))
        out = list(seq)
        with pytest.raises(LlamaforgeError, match="context window"):
            engine.submit(Sequence(list(range(32)), greedy(1)))
        with pytest.raises(LlamaforgeError, match="empty"):
            engine.submit(Sequence([], greedy(1)))
        with pytest.raises(LlamaforgeError, match="token ids"):
            engine.submit(Sequence([512], greedy(1)))
    finally:
        engine.stop()
    assert len(out) == 12 and seq.finish_reason == "length"  # 20 prompt + 12 new = 32


def test_waiting_line_is_bounded(model):
    engine = Engine(model, max_batch=1, max_queue=1, max_seq_len=64)  # not started: nothing runs yet
    a = engine.submit(Sequence([1, 2, 3], greedy(5)))
    b = engine.submit(Sequence([4, 5], greedy(5)))
    with pytest.raises(QueueFull):
        engine.submit(Sequence([6], greedy(5)))
    engine.start()
    try:
        assert len(list(a)) == 5 and len(list(b)) == 5
        assert len(list(engine.submit(Sequence([6], greedy(5))))) == 5
    finally:
        engine.stop()
    with pytest.raises(LlamaforgeError, match="not running"):
        engine.submit(Sequence([6], greedy(5)))


def test_logprobs_match_the_full_forward(model):
    p = prompts(1, seed=9)[0]
    engine = Engine(model, max_batch=2, max_seq_len=128)
    try:
        seq = Sequence(p, greedy(6), logprobs=3)
        engine.submit(Sequence(prompts(1, seed=10)[0], greedy(8)))
        engine.submit(seq)
        engine.start()
        steps = list(seq)
    finally:
        engine.stop()
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([p + seq.tokens]))[0], -1)
    for i, st in enumerate(steps):
        row = lp[len(p) - 1 + i]
        assert abs(st.logprob - row[st.token].item()) < 1e-4
        assert len(st.top) == 3 and st.top[0][0] == st.token and abs(st.top[0][1] - row.max().item()) < 1e-4


def test_jobs_run_on_the_engine_thread_between_steps(model):
    engine = Engine(model, max_batch=2, max_seq_len=64).start()
    try:
        seq = engine.submit(Sequence([1, 2, 3], greedy(40)))
        name = engine.call(lambda: threading.current_thread().name).result(timeout=10)
        with pytest.raises(ZeroDivisionError):
            engine.call(lambda: 1 / 0).result(timeout=10)
        assert len(list(seq)) == 40  # the failing job did not disturb the sequence
    finally:
        engine.stop()
    assert name == "llamaforge-engine"


def test_stop_cancels_everything(model):
    engine = Engine(model, max_batch=1, max_seq_len=256).start()
    seqs = [engine.submit(Sequence([i + 1], greedy(10_000))) for i in range(3)]
    time.sleep(0.05)
    engine.stop()
    assert all(s.done and s.finish_reason in ("cancelled", "length") for s in seqs)
    assert not engine.alive


def test_same_prompt_rows_share_one_prefill(model):
    # a request's n choices: one prefill, copied cache rows, and each row still decodes as if alone
    p, other = prompts(2, seed=9)
    engine = Engine(model, max_batch=6, max_seq_len=128)
    try:
        hold = engine.submit(Sequence(other, greedy(40)))  # another prompt in the same prefill group
        seqs = [Sequence(p, SamplingConfig(max_new_tokens=12, temperature=1.0, seed=s)) for s in (1, 2, 3)] + [Sequence(p, greedy(12))]
        outs = run(engine, seqs)
        list(hold)
    finally:
        engine.stop()
    assert engine.stats["prompt_tokens"] == len(p) + len(other) and engine.stats["prefills"] == 1
    check_greedy(model, p, outs[3])
    alone = Engine(model, max_batch=1, max_seq_len=128)
    try:
        for s, out in zip((1, 2, 3), outs):
            assert run(alone, [Sequence(p, SamplingConfig(max_new_tokens=12, temperature=1.0, seed=s))])[0] == out
    finally:
        alone.stop()
    assert len({tuple(o) for o in outs[:3]}) > 1


def test_constraint_hook_per_row(model):
    ps = prompts(3, seed=4)
    engine = Engine(model, max_batch=3, max_seq_len=128)
    try:
        hooks = [OnlyEven(5), None, OnlyEven(5)]
        seqs = [Sequence(p, greedy(20), constraint=h) for p, h in zip(ps, hooks)]
        outs = run(engine, seqs)
    finally:
        engine.stop()
    for out, h, s in zip(outs, hooks, seqs):
        if h is None:
            assert len(out) == 20 and any(t % 2 for t in out)
        else:
            assert len(out) == 5 and all(t % 2 == 0 for t in out) and s.finish_reason == "stop"
            assert h.seen == [20, 19, 18, 17, 16]  # the budget left, this token included


# ---- prefix cache ----

def test_prefix_cache_reuses_finished_and_running_sequences(model):
    """Prompts sharing a system-prompt-like prefix: later ones start from the pooled or running row's
    keys and values and still decode exactly what they decode alone, joined in one batch or not."""
    g = torch.Generator().manual_seed(7)
    system = torch.randint(0, 512, (48,), generator=g).tolist()
    tails = [torch.randint(0, 512, (int(n),), generator=g).tolist() for n in (3, 9, 1, 20, 6, 14)]
    ps = [system + t for t in tails]
    lengths = [6, 25, 9, 4, 18, 11]
    plain = Engine(model, max_batch=3, max_seq_len=128, prefix_cache_bytes=0)
    try:
        want = run(plain, [Sequence(p, greedy(n)) for p, n in zip(ps, lengths)])
    finally:
        plain.stop()
    assert plain.stats["cached_tokens"] == 0
    engine = Engine(model, max_batch=3, max_seq_len=128)
    try:
        first = Sequence(ps[0], greedy(lengths[0]))
        assert run(engine, [first])[0] == want[0] and first.cached_tokens == 0
        time.sleep(0.05)
        assert len(engine.prefix_cache) == 1
        # a second identical conversation turn: the whole earlier sequence is a prefix of it
        again = Sequence(ps[0] + want[0] + [1, 2], greedy(5))
        assert again.cached_tokens == 0
        out = run(engine, [again])[0]
        check_greedy(model, again.prompt, out)
        assert again.cached_tokens == len(ps[0]) + len(want[0]) - 1
        seqs = [Sequence(p, greedy(n)) for p, n in zip(ps[1:], lengths[1:])]
        outs = run(engine, seqs)
    finally:
        engine.stop()
    assert outs == want[1:]
    assert all(s.cached_tokens >= len(system) for s in seqs)
    st = engine.stats
    assert st["cached_tokens"] + st["prefilled_tokens"] == st["prompt_tokens"] and st["cached_tokens"] > 5 * len(system)


def test_prefix_cache_rows_with_different_reuse_batch_together(model):
    """One prefill over rows that reuse 0, some or almost all of their prompts equals each alone."""
    g = torch.Generator().manual_seed(11)
    base = torch.randint(0, 512, (60,), generator=g).tolist()
    engine = Engine(model, max_batch=4, max_seq_len=128)
    try:
        run(engine, [Sequence(base, greedy(3))])
        time.sleep(0.05)
        ps = [base[:30] + [1, 2, 3], torch.randint(0, 512, (25,), generator=g).tolist(), base + [4], base[:10] + [9] * 40]
        seqs = [Sequence(p, greedy(12)) for p in ps]
        outs = run(engine, seqs)
    finally:
        engine.stop()
    assert [s.cached_tokens for s in seqs] == [30, 0, 60, 10]
    for p, out in zip(ps, outs):
        check_greedy(model, p, out)


def test_prefix_cache_evicts_least_recently_used_within_budget(model):
    g = torch.Generator().manual_seed(5)
    ps = [torch.randint(0, 512, (40,), generator=g).tolist() for _ in range(3)]
    per_token = sum(2 * l.attention.kv_cache.k_cache[0, :, :1].numel() * 4 for l in model.layers)  # k and v, fp32
    engine = Engine(model, max_batch=2, max_seq_len=128, prefix_cache_bytes=100 * per_token)  # two 44-token entries
    try:
        for p in ps:
            run(engine, [Sequence(p, greedy(5))])
            time.sleep(0.05)
        pool = engine.prefix_cache
        assert len(pool) == 2 and pool.bytes <= pool.budget
        assert pool.lookup(ps[0])[0] == 0 and pool.lookup(ps[2])[0] == 40  # the oldest went first
        s0, s1 = Sequence(ps[0] + [1], greedy(4)), Sequence(ps[1] + [1], greedy(4))
        outs = run(engine, [s0, s1])
    finally:
        engine.stop()
    assert s0.cached_tokens == 0 and s1.cached_tokens == 40
    check_greedy(model, s0.prompt, outs[0])
    check_greedy(model, s1.prompt, outs[1])
