"""The inference pipeline gives the model's own predictions (CPU: eager; GPU: graphs)."""

from __future__ import annotations

import pytest
import torch

from recserve.loadgen.synthetic import QueryFactory
from recserve.models import MODEL_NAMES, build_model
from recserve.pipeline import GPUPipeline


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_cpu_pipeline_is_the_model(name: str) -> None:
    model = build_model(name, preset="tiny", seed=0)
    batch = QueryFactory(model.config, "uniform", seed=1).make(7)
    with torch.inference_mode():
        assert torch.equal(GPUPipeline(model)(batch), model(batch))


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gpu_pipeline_matches_eager(name: str) -> None:
    model = build_model(name, preset="small", seed=0, device="cuda")
    pipe = GPUPipeline(model, buckets=(16, 64))
    queries = QueryFactory(model.config, "zipf:1.05", seed=2)
    for size in (5, 16, 40, 100):  # inside buckets (padded), exact, and past the largest
        batch = queries.make(size)
        other = queries.make(size)
        with torch.inference_mode():
            ref, ref_other = model(batch.to("cuda")), model(other.to("cuda"))
            out = pipe(batch)
            out_other = pipe(other)  # buffers and graph reused: the first result stays intact
        torch.cuda.synchronize()
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(out_other, ref_other, rtol=1e-4, atol=1e-6)
