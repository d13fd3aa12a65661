"""Every model on the tiny preset: shapes, finiteness, determinism, eager vs compiled."""

from __future__ import annotations

import pytest
import torch

from recserve.loadgen.synthetic import QueryFactory
from recserve.models import MODEL_NAMES, build_model, get_config

ALL = [*MODEL_NAMES, "dlrm-rmc1:dot"]


def _build(spec: str, seed: int = 0):
    name, _, interaction = spec.partition(":")
    return build_model(name, preset="tiny", seed=seed, interaction=interaction or "cat")


@pytest.mark.parametrize("spec", ALL)
def test_forward_shapes_and_range(spec: str) -> None:
    model = _build(spec)
    batch = QueryFactory(model.config, "uniform", seed=1, jitter=True).make(13)
    with torch.inference_mode():
        out = model(batch)
    assert out.shape == (13, model.config.num_tasks)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert ((out > 0) & (out < 1)).all()


@pytest.mark.parametrize("spec", ALL)
def test_same_seed_same_output_other_seed_differs(spec: str) -> None:
    batch = QueryFactory(_build(spec).config, "zipf:1.05", seed=2).make(9)
    with torch.inference_mode():
        a, b, c = _build(spec, 0)(batch), _build(spec, 0)(batch), _build(spec, 1)(batch)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("spec", ALL)
def test_items_are_independent(spec: str) -> None:
    """Scoring a sub-batch gives the same scores as scoring it inside a larger batch."""
    model = _build(spec)
    batch = QueryFactory(model.config, "uniform", seed=3, jitter=True).make(10)
    with torch.inference_mode():
        whole = model(batch)
        part = model(batch.slice_items(3, 7))
    torch.testing.assert_close(part, whole[3:7], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ALL)
def test_eager_matches_torch_compile(spec: str) -> None:
    model = _build(spec)
    batch = QueryFactory(model.config, "uniform", seed=4).make(8)
    compiled = torch.compile(model.dense_forward, backend="aot_eager", dynamic=False)
    with torch.inference_mode():
        sparse = model.sparse(batch.sparse)
        eager = model.dense_forward(batch.dense, sparse)
        out = compiled(batch.dense, sparse)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)


def test_embeddings_change_the_output() -> None:
    """Different ids give different scores (the sparse part is wired in)."""
    model = _build("dlrm-rmc1")
    with torch.no_grad():
        for w in model.sparse.backend.weights:
            w.normal_()
    q = QueryFactory(model.config, "uniform", seed=5)
    a = q.make(4)
    b = q.make(4)
    b.dense = a.dense.clone()
    with torch.inference_mode():
        assert not torch.allclose(model(a), model(b))


def test_dlrm_rejects_inconsistent_top_mlp() -> None:
    import dataclasses

    cfg = get_config("dlrm-rmc1", "tiny")
    bad = dataclasses.replace(cfg, top_mlp=(cfg.top_mlp[0] + 1, *cfg.top_mlp[1:]))
    with pytest.raises(ValueError, match="top MLP input"):
        build_model(bad)


def test_din_attention_ignores_padding() -> None:
    """Ids beyond a sequence's length must not affect the score."""
    from recserve.types import Batch, KeyedJagged

    model = _build("din")
    with torch.no_grad():
        for w in model.sparse.backend.weights:
            w.normal_()
    batch = QueryFactory(model.config, "uniform", seed=6).make(3)
    s = batch.sparse
    # Rebuild with one more history id for item 0, then compare against the shorter history.
    keys = s.keys
    feats = {k: s.feature(k) for k in keys}
    hist_v, hist_o = feats["history"]
    with torch.inference_mode():
        base = model(batch)
        lengths = hist_o[1:] - hist_o[:-1]
        if int(lengths[0]) < model.config.sequences[0].max_len:
            extra = torch.cat([hist_v[: hist_o[1]], torch.tensor([7]), hist_v[hist_o[1] :]])
            new_o = hist_o.clone()
            new_o[1:] += 1
            feats["history"] = (extra, new_o)
            longer = Batch(batch.dense, KeyedJagged.from_dict(feats, 3))
            out = model(longer)
            assert not torch.allclose(out[0], base[0])
            torch.testing.assert_close(out[1:], base[1:])
