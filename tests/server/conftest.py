"""Fixtures: a model repository of tiny models, and real servers on 127.0.0.1 ephemeral ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from server_helpers import MAX_BODY, MAX_ITEMS, REPO_MODELS

from recserve.models import RecModel, build_model, save_model
from recserve.server import ServerSettings, ServerThread, ServingConfig


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    for i, name in enumerate(REPO_MODELS):
        save_model(build_model(name, "tiny", seed=i), root / name)
    return root


@pytest.fixture(scope="session")
def models(repo: Path) -> dict[str, RecModel]:
    from recserve.models import load_model

    return {name: load_model(repo / name) for name in REPO_MODELS}


@pytest.fixture(scope="module", params=[0, 2], ids=["one-process", "frontends"])
def server(repo: Path, request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    """The server answering on its own event loop, then with two front-end processes that
    decode requests and pass everything else through (the same tests hold for both)."""
    settings = ServerSettings(
        repository=repo,
        models=("wnd", "dlrm-rmc2", "mt-wnd", "ncf", "din"),
        http_port=0,
        grpc_port=0,
        max_body_bytes=MAX_BODY,
        offload_bytes=64 << 10,
        grace_s=5.0,
        frontends=request.param,
        serving=ServingConfig(max_items=MAX_ITEMS),
    )
    with ServerThread(settings) as thread:
        yield thread
