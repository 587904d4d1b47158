"""The PCA-initialised rotation before Matryoshka truncation (train/pca_rotation.py) and its folder format
(formats/st_modules.py): PCA against scikit-learn, orthogonality and variance order, the saved folder's round trip,
sentence-transformers loading the same folder and giving the same vectors, training with it, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import need
from llmlab.cli import main
from llmlab.common import LlmlabError
from llmlab.formats.convert import write_loaded
from llmlab.formats.load import load_model
from llmlab.formats.st_modules import read_projection
from llmlab.infer.embed import embed_texts
from llmlab.train.pca_rotation import attach_pca_projection_, pca_axes, pca_projection

TEXTS = [f"Return the {w} of item {i} in the {c}." for i, (w, c) in enumerate(
    (w, c) for w in ("length", "sum", "first element", "hash", "name", "copy")
    for c in ("list", "deque", "mapping", "file", "socket", "queue", "archive"))]  # 42 texts


def _anisotropic(n: int = 300, d: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 0.1, d)
    rot, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    return (torch.randn(n, d, generator=g) * scales) @ rot.T + torch.randn(d, generator=g)  # (n, d)


def test_pca_axes_equal_numpy_svd_orthogonal_and_ordered_by_variance():
    """Against PCA by NumPy's SVD of the centred data (scikit-learn's PCA, without importing it): X - mu =
    U S V^T, axes = rows of V^T, variances S^2 / (N - 1)."""
    import numpy as np

    x = _anisotropic()
    axes, var, mu = pca_axes(x)
    xn = x.double().numpy()
    _, sv, vt = np.linalg.svd(xn - xn.mean(0), full_matrices=False)
    torch.testing.assert_close(var.double(), torch.from_numpy(sv ** 2 / (len(xn) - 1)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mu.double(), torch.from_numpy(xn.mean(0)), rtol=1e-5, atol=1e-6)
    cos = (axes.double() * torch.from_numpy(vt)).sum(1)  # each axis against the SVD's, up to sign
    torch.testing.assert_close(cos.abs(), torch.ones(12, dtype=torch.float64), rtol=0, atol=1e-5)
    assert (axes.abs().max(1).values == axes.max(1).values).all()  # svd_flip: largest entry positive
    torch.testing.assert_close(axes @ axes.T, torch.eye(12), rtol=0, atol=1e-5)  # orthogonal
    assert (var[:-1] >= var[1:]).all()
    y = pca_projection(x, center=True)(x).detach()  # coordinate k has variance lambda_k, mean 0
    torch.testing.assert_close(y.var(0), var, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y.mean(0), torch.zeros(12), rtol=0, atol=1e-4)


def test_uncentred_rotation_keeps_every_full_size_cosine():
    x = _anisotropic()
    p = pca_projection(x)  # b = 0
    assert p.bias.abs().max() == 0
    with torch.no_grad():
        torch.testing.assert_close(F.normalize(p(x)) @ F.normalize(p(x)).T, F.normalize(x) @ F.normalize(x).T,
                                   rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def projected(tiny_encoder, tmp_path_factory):
    """The tiny encoder with a PCA rotation (then nudged, so it is not the identity's twin), saved as a folder."""
    loaded = load_model(tiny_encoder)
    attach_pca_projection_(loaded.model, loaded.tokenizer, TEXTS, max_tokens=16)
    with torch.no_grad():
        loaded.model.projection.bias.add_(0.05)
    folder = tmp_path_factory.mktemp("pca") / "model"
    write_loaded(loaded, folder)
    return loaded, folder


def test_saved_folder_round_trip(projected):
    import llmlab

    loaded, folder = projected
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Dense", "Normalize"]
    again = load_model(str(folder))
    assert again.model.projection is not None
    torch.testing.assert_close(again.model.projection.state_dict(), loaded.model.projection.state_dict())
    llm = llmlab.load(str(folder))
    with torch.no_grad():
        ids = loaded.tokenizer.encode(TEXTS[0], add_special=True)
        hidden = loaded.model(torch.tensor([ids]))  # (1, T, 32)
        want = F.normalize(loaded.model.projection(hidden.mean(1)), dim=-1)  # pool -> Dense -> normalise
    torch.testing.assert_close(llm.embed(TEXTS[:1], precision="float32"), want, rtol=0, atol=1e-5)


def test_sentence_transformers_loads_the_folder_and_gives_the_same_vectors(projected):
    need("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    loaded, folder = projected
    st = SentenceTransformer(str(folder), device="cpu")
    st.max_seq_length = 16
    assert type(st[2]).__name__ == "Dense"
    ref = st.encode(TEXTS[:8], convert_to_tensor=True, normalize_embeddings=True).float()
    ours = embed_texts(loaded.model.eval(), loaded.tokenizer, TEXTS[:8], max_tokens=16)  # the model in memory
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-5)


def test_training_with_a_pca_projection_saves_the_trained_projection(tmp_path, tiny_encoder):
    from llmlab.train.contrastive import EmbedConfig, EmbedTrainConfig, run_embed_train

    pairs = tmp_path / "p.jsonl"
    pairs.write_text("".join(json.dumps({"query": t, "document": t.upper() + " Items are numbered."}) + "\n"
                             for t in TEXTS))  # 84 texts; the dev pairs (a tenth, by key) left out: still >= 32
    cfg = EmbedConfig(model=tiny_encoder, out=str(tmp_path / "run"), pairs=str(pairs), matryoshka_dims="32,8",
                      max_tokens=16, projection="pca")
    s = run_embed_train(cfg, EmbedTrainConfig(steps=2, batch_size=8, lr=3e-3, warmup=0, progress=False))
    trained = read_projection(Path(s["saved"]), 32)
    assert trained is not None and trained.bias.abs().max() > 1e-4  # trained with the encoder (the PCA init has b = 0)
    # ... from the PCA rotation: still nearly orthogonal after 2 small steps
    torch.testing.assert_close(trained.weight @ trained.weight.T, torch.eye(32), rtol=0, atol=0.05)


def test_bad_input(projected, tmp_path, tiny_encoder, capsys):
    loaded, folder = projected
    with pytest.raises(LlmlabError, match="a full rotation needs at least 32 texts"):
        attach_pca_projection_(loaded.model, loaded.tokenizer, TEXTS[:5])
    with pytest.raises(LlmlabError, match="at least 2 texts"):
        pca_axes(torch.randn(1, 4))
    with pytest.raises(LlmlabError, match="written as a plain float folder"):
        write_loaded(loaded, tmp_path / "m.gguf")
    bad = tmp_path / "bad"
    for field, value, message in (("activation_function", "torch.nn.modules.activation.Tanh", "Identity only"),
                                  ("out_features", 16, "a 32 -> 16 projection")):
        shutil.copytree(folder, bad, dirs_exist_ok=True)
        cfg = json.loads((folder / "2_Dense" / "config.json").read_text())
        (bad / "2_Dense" / "config.json").write_text(json.dumps({**cfg, field: value}))
        with pytest.raises(LlmlabError, match=message):
            load_model(str(bad))
    with pytest.raises(SystemExit) as e:
        main(["embed", "train", "--model", tiny_encoder, "--projection", "svd", "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'svd'" in err and "Traceback" not in err
    tiny_pairs = tmp_path / "few.jsonl"
    tiny_pairs.write_text("".join(json.dumps({"query": t, "document": t}) + "\n" for t in TEXTS[:4]))
    assert main(["embed", "train", "--model", tiny_encoder, "--pairs", str(tiny_pairs), "--projection", "pca",
                 "--matryoshka-dims", "32,8", "--eval-dims", "32", "--out", str(tmp_path / "r")]) == 2
    assert "PCA of 8 texts for a 32-d encoder" in capsys.readouterr().err

