"""Coalescing queries into one batch (what the GPU runner stages into pinned buffers)."""

from __future__ import annotations

import pytest
import torch

from recserve.engine.batching import HostBuffers, concat_batches
from recserve.loadgen.synthetic import QueryFactory
from recserve.models.registry import build_model
from recserve.types import validate_batch


@pytest.mark.parametrize("name", ["dlrm-rmc1", "din", "mt-wnd"])
@pytest.mark.parametrize("buffers", [False, True])
@pytest.mark.parametrize("sizes", [(3, 1, 17, 8), (17,)], ids=["four", "one"])
def test_coalesced_batch_answers_like_its_queries(
    name: str, buffers: bool, sizes: tuple[int, ...]
) -> None:
    model = build_model(name, preset="tiny", seed=1)
    factory = QueryFactory(model.config, "zipf:1.05", seed=2, jitter=True)
    batches = [factory.make(n) for n in sizes]
    keys = batches[0].sparse.keys
    out = None
    if buffers:
        n_ids = sum(b.sparse.values.numel() for b in batches)
        out = HostBuffers.allocate(40, n_ids + 5, len(keys), model.config.num_dense)
    merged = concat_batches(batches, keys, out)
    validate_batch(merged, model.config)
    assert merged.sparse.offset_per_key == merged.sparse.offsets[:: merged.batch_size].tolist()
    if out is not None:
        assert merged.sparse.values.data_ptr() == out.values.data_ptr()
    with torch.inference_mode():
        expected = torch.cat([model(b) for b in batches])
        torch.testing.assert_close(model(merged), expected, rtol=1e-5, atol=1e-6)


def test_features_are_put_in_the_requested_order() -> None:
    model = build_model("dlrm-rmc1", preset="tiny", seed=1)
    batch = QueryFactory(model.config, seed=3).make(5)
    keys = batch.sparse.keys
    for count in (1, 2):
        out = HostBuffers.allocate(10, 10_000, len(keys), model.config.num_dense)
        merged = concat_batches([batch] * count, tuple(reversed(keys)), out)
        assert merged.sparse.keys == tuple(reversed(keys))
        assert torch.equal(
            merged.sparse.feature(keys[0])[0],
            torch.cat([batch.sparse.feature(keys[0])[0]] * count),
        )


def test_buffers_that_are_too_small_are_refused() -> None:
    model = build_model("ncf", preset="tiny", seed=1)
    batch = QueryFactory(model.config, seed=3).make(10)
    out = HostBuffers.allocate(8, 1000, len(batch.sparse.keys), model.config.num_dense)
    with pytest.raises(ValueError, match="does not fit"):
        concat_batches([batch], batch.sparse.keys, out)
