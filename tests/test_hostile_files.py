"""Bad and hostile files through the command line, as a hostile model or data publisher would write them:
corrupt or lying GGUF, safetensors and config.json for `info`, `generate`, `convert` and `finetune`;
bad JSONL for `finetune` / `dpo`; hostile chat templates; standard input that is not UTF-8; a chat
line longer than the context window. Each gets one line `llamaforge: error: ...` naming the file and
the problem and exit 2 (no traceback, no hang, no unbounded memory), or works.

Everything runs in-process through `commands.main` on a tiny model (dim 64, 2 layers, a 259-piece
byte-level tokenizer, context 256), so a case costs milliseconds."""
import io
import json
import shutil
import struct
import sys

import numpy as np
import pytest
import torch

from llamaforge import ModelConfig
from llamaforge.chat import CHATML_TEMPLATE
from llamaforge.commands import main
from llamaforge.gguf import map_name
from llamaforge.model import Transformer

# ---- a tiny model, as an HF directory and as a GGUF file written byte by byte ----


def byte_tokenizer(out):
    """A byte-level BPE (token id == byte value) with ChatML specials; tokenizer.json + tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from llamaforge.tokenizer import HFTokenizer
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:] + [256 + i for i in range(256 - len(bs))]
    bs += [b for b in range(256) if b not in bs]
    tk = Tokenizer(models.BPE(vocab={chr(c): b for b, c in zip(bs, cs)}, merges=[]))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(s, special=True) for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    out.mkdir(parents=True, exist_ok=True)
    tk.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "add_bos_token": False}))
    return HFTokenizer.from_file(out / "tokenizer.json")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from llamaforge.weights import save_hf
    root = tmp_path_factory.mktemp("hostile")
    tok = byte_tokenizer(root / "tok")
    cfg = ModelConfig.from_dict({**ModelConfig.from_name("tiny").to_dict(), "vocab_size": tok.vocab_size})  # dim 64, 2 layers
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(std=0.02)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    save_hf(root / "hf", cfg, sd, tok, CHATML_TEMPLATE)
    (root / "sft.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    (root / "gguf").mkdir()
    return {"root": root, "cfg": cfg, "sd": sd, "hf": root / "hf", "tok": root / "tok" / "tokenizer.json",
            "data": root / "sft.jsonl"}


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


_FMT = {4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q"}


def _value(vtype: int, v) -> bytes:
    if vtype == 8:
        return _str(v)
    if vtype == 9:
        if isinstance(v, bytes):  # an encoded array body, as is
            return v
        sub, items = v
        return struct.pack("<IQ", sub, len(items)) + b"".join(_value(sub, x) for x in items)
    return struct.pack(_FMT[vtype], v)


def base_metadata(cfg: ModelConfig) -> dict:
    return {"general.architecture": (8, "llama"), "general.name": (8, "tiny"), "llama.context_length": (4, cfg.max_seq_len),
            "llama.embedding_length": (4, cfg.dim), "llama.block_count": (4, cfg.n_layers),
            "llama.feed_forward_length": (4, cfg.hidden_dim), "llama.attention.head_count": (4, cfg.n_heads),
            "llama.attention.head_count_kv": (4, cfg.n_kv_heads), "llama.attention.layer_norm_rms_epsilon": (6, 1e-5),
            "llama.rope.freq_base": (6, 10000.0), "llama.vocab_size": (4, cfg.vocab_size)}


def write_gguf_raw(path, meta: dict, tensors: dict[str, np.ndarray]) -> None:
    """GGUF v3 (ggml gguf.cpp's layout) with F32 tensors, written byte by byte so that any lie can be told."""
    head = struct.pack("<IIQQ", 0x46554747, 3, len(tensors), len(meta))
    head += b"".join(_str(k) + struct.pack("<I", t) + _value(t, v) for k, (t, v) in meta.items())
    data, offsets = b"", []
    for name, arr in tensors.items():
        offsets.append(len(data))
        data += arr.astype(np.float32).tobytes() + b"\0" * (-arr.nbytes % 32)
    for (name, arr), off in zip(tensors.items(), offsets):
        head += _str(name) + struct.pack("<I", arr.ndim) + b"".join(struct.pack("<Q", d) for d in reversed(arr.shape))
        head += struct.pack("<IQ", 0, off)
    head += b"\0" * (-len(head) % 32)
    path.write_bytes(head + data)


def gguf_tensors(sd: dict) -> dict[str, np.ndarray]:
    return {map_name(k, to_gguf=True): v.numpy() for k, v in sd.items()}


# ---- running the command line ----

def run(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err and len(lines) == 1, err[-2000:]
    assert lines[0].startswith("llamaforge: error: "), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def four_commands(files, model, tmp_path, own_tokenizer: bool = False) -> dict[str, list]:
    """info, generate, convert and finetune on `model` (generate with our tokenizer.json unless `own_tokenizer`)."""
    tok = [] if own_tokenizer else ["--tokenizer", files["tok"]]
    return {"info": ["info", model],
            "generate": ["generate", "-m", model, *tok, "-p", "hi", "--max-new-tokens", "2"],
            "convert": ["convert", model, tmp_path / "out", "--to", "hf"],
            "finetune": ["finetune", "--model", model, "--data", files["data"], "--out", tmp_path / "ft", "--max-steps", "1",
                         "--batch-size", "1", "--micro-batch-size", "1", "--seq-len", "64", "--device", "cpu"]}


def assert_all_refuse(capsys, files, model, tmp_path, *fragments, own_tokenizer=False):
    for name, args in four_commands(files, model, tmp_path, own_tokenizer).items():
        rc, _, err = run(capsys, *args)
        assert_one_line_error(rc, err, *fragments)
        assert not (tmp_path / "out").exists()  # convert wrote nothing


def test_the_tiny_files_are_good(files, tmp_path, capsys):
    # the baselines the corruptions start from load, convert and generate
    meta, tensors = base_metadata(files["cfg"]), gguf_tensors(files["sd"])
    write_gguf_raw(tmp_path / "good.gguf", meta, tensors)
    for model in (files["hf"], tmp_path / "good.gguf"):
        cmds = four_commands(files, model, tmp_path)
        for name in ("info", "generate", "convert"):
            rc, out, err = run(capsys, *cmds[name])
            assert rc == 0, (name, err)
        shutil.rmtree(tmp_path / "out")


# ---- GGUF: deep arrays, bad or lying sizes, shapes that disagree with the config ----

PIECES = [chr(0x100 + i) for i in range(300)]  # byte-level-looking vocabulary entries
DEEP = b"".join([struct.pack("<IQ", 9, 1)] * 100_000) + struct.pack("<IQ", 4, 0)  # arrays nested 100k deep

GGUF_CASES = {
    "nested arrays": ({"x.deep": (9, DEEP)}, None, "nested more than"),
    "head_count 0": ({"llama.attention.head_count": (4, 0)}, None, "llama.attention.head_count"),
    "head_count_kv 0": ({"llama.attention.head_count_kv": (4, 0)}, None, "llama.attention.head_count_kv"),
    "block_count 0": ({"llama.block_count": (4, 0)}, None, "llama.block_count"),
    "head_count a string": ({"llama.attention.head_count": (8, "four")}, None, "llama.attention.head_count"),
    "head_count_kv per layer": ({"llama.attention.head_count_kv": (9, (4, [2, 2]))}, None, "head_count_kv"),
    "block_count 10^6": ({"llama.block_count": (4, 10 ** 6)}, None, "llama.block_count"),
    "block_count 3 for 2 layers": ({"llama.block_count": (4, 3)}, None, "tensors missing"),
    "embedding_length lies": ({"llama.embedding_length": (4, 128)}, None, "the config needs"),
    "heads do not divide dim": ({"llama.attention.head_count": (4, 5)}, None, "not divisible"),
    "context_length 2^40": ({"llama.context_length": (10, 1 << 40)}, None, "llama.context_length"),
    "vocab_size 10^9": ({"llama.vocab_size": (4, 10 ** 9)}, None, "llama.vocab_size"),
    "rms eps NaN": ({"llama.attention.layer_norm_rms_epsilon": (6, float("nan"))}, None, "layer_norm_rms_epsilon"),
    "tokens not strings": ({"tokenizer.ggml.model": (8, "gpt2"), "tokenizer.ggml.tokens": (9, (4, [1, 2]))}, None,
                           "tokenizer.ggml.tokens"),
    "chat template a number": ({"tokenizer.chat_template": (4, 7)}, None, "tokenizer.chat_template"),
    "merges that are not pairs": ({"tokenizer.ggml.model": (8, "gpt2"), "tokenizer.ggml.tokens": (9, (8, PIECES[:259])),
                                   "tokenizer.ggml.merges": (9, (8, ["ab"]))}, None, "merges are not valid"),
    "more tokens than embedding rows": ({"tokenizer.ggml.model": (8, "gpt2"), "tokenizer.ggml.tokens": (9, (8, PIECES))},
                                        None, "the tokenizer has 300 tokens"),
    "tensor dims disagree": ({}, {"blk.0.attn_q.weight": np.zeros((32, 64))}, "attention.wq"),
    "unknown tensor": ({}, {"blk.0.evil.weight": np.zeros(4)}, "unexpected tensor"),
    "rope_freqs misshapen": ({}, {"rope_freqs.weight": np.ones(3)}, "rope_freqs"),
}


@pytest.mark.parametrize("case", GGUF_CASES)
def test_bad_gguf(case, files, tmp_path, capsys):
    meta_changes, tensor_changes, fragment = GGUF_CASES[case]
    meta = {**base_metadata(files["cfg"]), **meta_changes}
    tensors = {**gguf_tensors(files["sd"]), **(tensor_changes or {})}
    path = tmp_path / "bad.gguf"
    write_gguf_raw(path, meta, tensors)
    assert_all_refuse(capsys, files, path, tmp_path, str(path), fragment, own_tokenizer="tokenizer.ggml.model" in meta)


# ---- safetensors: 13 kinds of corrupt header, and tensors that disagree with config.json ----

def st_parts(path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def st_bytes(header, data: bytes, length: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data


def _first(h):
    return next(k for k in h if k != "__metadata__")


def _edit(fn):
    def make(h, data):
        h = json.loads(json.dumps(h))
        fn(h)
        return st_bytes(h, data)
    return make


SAFETENSORS_CASES = {
    "huge header length": lambda h, d: st_bytes(h, d, 1 << 62),
    "header length past the end": lambda h, d: st_bytes(h, d, len(json.dumps(h)) + len(d) + 100),
    "header not UTF-8": lambda h, d: st_bytes(b'{"\xff\xfe": 1}', d),
    "header not JSON": lambda h, d: st_bytes(b"{not json" + b" " * 20, d),
    "header a JSON list": lambda h, d: st_bytes(b"[1, 2, 3]", d),
    "offsets past the end": _edit(lambda h: h[_first(h)].update(data_offsets=[0, 10 ** 12])),
    "overlapping offsets": _edit(lambda h: [h[k].update(data_offsets=h[_first(h)]["data_offsets"]) for k in list(h)[1:3]
                                            if k != "__metadata__"]),
    "negative offsets": _edit(lambda h: h[_first(h)].update(data_offsets=[-256, 0])),
    "unknown dtype": _edit(lambda h: h[_first(h)].update(dtype="Q7")),
    "absurd shape": _edit(lambda h: h[_first(h)].update(shape=[1 << 40, 1 << 40])),
    "shape that disagrees with its bytes": _edit(lambda h: h[_first(h)].update(shape=[3])),
    "metadata of the wrong type": _edit(lambda h: h.update(__metadata__={"format": [1, 2]})),
    "truncated data": lambda h, d: st_bytes(h, d[: len(d) // 2]),
    "truncated header": lambda h, d: st_bytes(h, d)[:20],
}


@pytest.mark.parametrize("case", SAFETENSORS_CASES)
def test_bad_safetensors(case, files, tmp_path, capsys):
    model = tmp_path / "hf"
    shutil.copytree(files["hf"], model)
    header, data = st_parts(model / "model.safetensors")
    (model / "model.safetensors").write_bytes(SAFETENSORS_CASES[case](header, data))
    assert_all_refuse(capsys, files, model, tmp_path, "model.safetensors")


def test_safetensors_that_disagree_with_config_json(files, tmp_path, capsys):
    from safetensors.torch import save_file
    model = tmp_path / "hf"
    shutil.copytree(files["hf"], model)
    from safetensors.torch import load_file
    sd = load_file(model / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)  # the config says (176, 64)
    save_file(sd, model / "model.safetensors")
    assert_all_refuse(capsys, files, model, tmp_path, "feed_forward.w3", "the config needs (176, 64)")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, model / "model.safetensors")
    assert_all_refuse(capsys, files, model, tmp_path, "missing")


CONFIG_CASES = {
    "num_attention_heads 0": ({"num_attention_heads": 0}, "num_attention_heads"),
    "max_position_embeddings 2^40": ({"max_position_embeddings": 1 << 40}, "max_position_embeddings"),
    "num_hidden_layers 10^6": ({"num_hidden_layers": 10 ** 6}, "num_hidden_layers"),
    "hidden_size a string": ({"hidden_size": "64"}, "hidden_size"),
    "hidden_size a float": ({"hidden_size": 64.5}, "hidden_size"),
    "vocab_size negative": ({"vocab_size": -1}, "vocab_size"),
    "rms_norm_eps a string": ({"rms_norm_eps": "tiny"}, "rms_norm_eps"),
    "rope_theta negative": ({"rope_theta": -1.0}, "rope_theta"),
    "kv heads do not divide heads": ({"num_key_value_heads": 3}, "not a multiple"),
    "head_dim lies": ({"head_dim": 7}, "head_dim"),
    "intermediate_size lies": ({"intermediate_size": 100}, "the config needs"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_json(case, files, tmp_path, capsys):
    model = tmp_path / "hf"
    shutil.copytree(files["hf"], model)
    change, fragment = CONFIG_CASES[case]
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, **change}))
    assert_all_refuse(capsys, files, model, tmp_path, fragment)


@pytest.mark.parametrize("content", [b"[" * 100_000 + b"]" * 100_000, b'{"hidden_size": \xff}', b"[1, 2]", b""])
def test_unreadable_config_json(content, files, tmp_path, capsys):
    model = tmp_path / "hf"
    shutil.copytree(files["hf"], model)
    (model / "config.json").write_bytes(content)
    assert_all_refuse(capsys, files, model, tmp_path, "config.json")


def test_unreadable_tokenizer_config(files, tmp_path, capsys):
    model = tmp_path / "hf"
    shutil.copytree(files["hf"], model)
    for content in (b"[" * 100_000 + b"]" * 100_000, b"[1]"):
        (model / "tokenizer_config.json").write_bytes(content)
        rc, _, err = run(capsys, "info", model)
        assert_one_line_error(rc, err, "tokenizer_config.json")


# ---- JSONL for finetune and dpo ----

GOOD_PREF = json.dumps({"prompt": "hi", "chosen": "hello", "rejected": "go away"})
JSONL_CASES = {  # (command, the bad line, what the error says)
    "100k-deep JSON": ("finetune", "[" * 100_000 + "]" * 100_000, "nests too deeply"),
    "lone surrogate in text": ("finetune", json.dumps({"text": "caf\ud800"}), "surrogate"),
    "lone surrogate in chat": ("finetune", json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                    {"role": "assistant", "content": "\udfff"}]}), "surrogate"),
    "not an object": ("finetune", "[1, 2, 3]", "expected a JSON object"),
    "content not a string": ("finetune", json.dumps({"messages": [{"role": "user", "content": 5},
                                                                  {"role": "assistant", "content": "x"}]}), "bad chat message"),
    "dpo: 100k-deep JSON": ("dpo", "{" * 50_000, "not valid JSON"),
    "dpo: lone surrogate": ("dpo", json.dumps({"prompt": "\ud800", "chosen": "a", "rejected": "b"}), "surrogate"),
    "dpo: not a preference": ("dpo", json.dumps({"text": "hello"}), "DPO lines need"),
}


@pytest.mark.parametrize("case", JSONL_CASES)
def test_bad_jsonl(case, files, tmp_path, capsys):
    command, line, fragment = JSONL_CASES[case]
    data = tmp_path / "bad.jsonl"
    good = files["data"].read_text() if command == "finetune" else GOOD_PREF + "\n"
    data.write_text(good + line + "\n")  # a good line, then the bad one: file:2
    rc, _, err = run(capsys, command, "--model", files["hf"], "--data", data, "--out", tmp_path / "ft", "--max-steps", "1",
                     "--batch-size", "1", "--micro-batch-size", "1", "--seq-len", "64", "--device", "cpu")
    assert_one_line_error(rc, err, f"{data}:2", fragment)
    assert not (tmp_path / "ft" / "ckpt").exists()  # nothing was written


# ---- chat templates from model files ----

TEMPLATE_CASES = {
    "range(10**9)": ("{% for i in range(10**9) %}x{% endfor %}", "was stopped"),
    "'x' * 10**10": ("{{ 'x' * 10**10 }}", "was stopped"),
    "self-recursive macro": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recurses too deeply"),
    "nested loops for minutes": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                                 "runs longer than"),
    "output without end": ("{% for i in range(100000) %}{{ 'y' * 100000 }}{% endfor %}", "was stopped"),
    "{% include %}": ("{% include 'other.j2' %}", "include"),
    "{% import %}": ("{% import 'other.j2' as m %}{{ m.x }}", "import"),
    "syntax error": ("{% for m in messages %}{{ m.content }", "does not parse"),
    "raise_exception": ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    "python error": ("{{ messages[0].content / 0 }}", "TypeError"),
}


@pytest.fixture
def fast_render(monkeypatch):
    import llamaforge.sandbox as sandbox
    monkeypatch.setattr(sandbox, "RENDER_SECONDS", 0.5)


@pytest.mark.parametrize("case", TEMPLATE_CASES)
def test_hostile_chat_template(case, files, tmp_path, capsys, monkeypatch, fast_render):
    template, fragment = TEMPLATE_CASES[case]
    model = tmp_path / "hf"
    shutil.copytree(files["hf"], model)
    tc = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**tc, "chat_template": template}))
    cmds = four_commands(files, model, tmp_path)
    rc, out, err = run(capsys, *cmds["info"])  # info says what is wrong instead of a format name
    assert rc == 0 and "Traceback" not in err
    rc, out, err = run(capsys, *cmds["generate"])  # plain text generation never renders the template
    assert rc == 0, err
    rc, out, err = run(capsys, *cmds["convert"])  # the template is data: it is copied as it is
    assert rc == 0 and json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == template
    rc, out, err = run(capsys, *cmds["finetune"])
    assert_one_line_error(rc, err, fragment)
    assert "no chat format" not in err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hello\nagain\n"), encoding="utf-8"))
    rc, out, err = run(capsys, "chat", "-m", model, "--max-new-tokens", "2")
    lines = [line for line in err.strip().splitlines() if line]
    assert "Traceback" not in err and lines and all(line.startswith("llamaforge: error: ") and fragment in line for line in lines), err
    assert rc == (0 if len(lines) == 2 else 2)  # a render error fails each line, a parse error the whole chat


# ---- standard input, and a chat line longer than the context ----

@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])  # a UTF-8 locale, and the C locale's PEP 383 escapes
def test_stdin_that_is_not_utf8(errors, files, capsys, monkeypatch):
    for command in ("generate", "chat"):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 \xff\xfe\n"), encoding="utf-8", errors=errors))
        rc, out, err = run(capsys, command, "-m", files["hf"], "--max-new-tokens", "3")
        assert rc == 0 and "Traceback" not in err and not err.strip(), err
        assert out.strip()
    rc, out, err = run(capsys, "generate", "-m", files["hf"], "-p", "caf\udce9", "--max-new-tokens", "3")  # argv's escapes
    assert rc == 0, err


def test_a_chat_line_longer_than_the_context_is_that_lines_error(files, capsys, monkeypatch):
    from llamaforge.llm import LLM
    prompts = []
    real = LLM.stream_ids

    def record(self, ids, **kw):
        prompts.append(self.tokenizer.decode(ids))
        return real(self, ids, **kw)
    monkeypatch.setattr(LLM, "stream_ids", record)
    lines = b"first question\n" + b"x" * 400 + b"\nsecond question\n"  # the context is 256 tokens
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(lines), encoding="utf-8"))
    rc, out, err = run(capsys, "chat", "-m", files["hf"], "--max-new-tokens", "4")
    assert rc == 0 and "Traceback" not in err
    assert err.strip().startswith("llamaforge: error: this message takes") and len(err.strip().splitlines()) == 1, err
    assert len(prompts) == 2 and "first question" in prompts[1] and "second question" in prompts[1]  # history kept


def test_bounded_render_equals_jinjas_sandbox_on_a_feature_rich_template():
    # the bounds must not change what a real template renders (the features of Llama 3.1's and Qwen's templates)
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from llamaforge.sandbox import _tojson, bounded_environment, render_bounded
    template = (
        "{%- set ns = namespace(sys='', n=0) -%}{%- if messages[0]['role'] == 'system' -%}{%- set ns.sys = messages[0]['content']|trim -%}"
        "{%- set messages = messages[1:] -%}{%- endif -%}<|sys|>{{ ns.sys ~ '\n' }}{%- if tools is defined -%}"
        "{{ tools|tojson(indent=4) }}{%- for t in tools|selectattr('type', 'equalto', 'function')|map(attribute='function') -%}"
        "{{ t.name|upper ~ ':' ~ t.parameters.properties|dictsort|map('first')|join(',') }}{% endfor %}{%- endif -%}"
        "{%- for m in messages -%}{%- set ns.n = ns.n + 1 -%}{%- if m.content is string and m.content.startswith('/') -%}"
        "{{ '[cmd ' ~ m.content.split(' ')[0][1:] ~ ']' }}{%- else -%}<|{{ m.role }}|>{{ m.content|replace('\t', '    ') }}"
        "{{ '<|eot|>' if not loop.last else '' }}{%- endif -%}{%- endfor -%}{%- for a, b in [('x', 1), ('y', 2)] -%}{{ a }}{{ b }}"
        "{%- endfor -%}{% set tail %}{{ ns.n }} turns, {{ '%05.1f'|format(3.14159) }}, {{ '{:>6}'.format('r') }}{% endset %}"
        "{{ tail|indent(2) }}{{ ('ab' * 3)|center(12) }}{{ [1, 2, 3]|sum }}{{ messages|length }}{{ range(3)|list }}"
        "{%- if add_generation_prompt %}<|assistant|>{% endif -%}")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"properties": {"city": {}, "unit": {}}}}}]
    msgs = [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "hi\tthere"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "/reset now"}]
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    plain.filters["tojson"] = _tojson
    want = plain.from_string(template).render(messages=msgs, tools=tools, add_generation_prompt=True)
    got = render_bounded(bounded_environment().from_string(template), messages=msgs, tools=tools, add_generation_prompt=True)
    assert got == want and "GET_WEATHER:city,unit" in got and "003.1" in got
