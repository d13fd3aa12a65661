"""Kernel tests: on the CPU under the Triton interpreter (the root conftest turns it on where
there is no GPU), on a GPU compiled (``gpu`` tests, ``TRITON_INTERPRET=0``)."""

import os

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh generator per test; the seed varies between runs so inputs stay fresh."""
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(4), "little"))
    return g
