"""Fixtures of the single-rank unit tests."""

import pytest


@pytest.fixture
def tp1(model_parallel):
    """megatron's groups at TP=1, PP=1 (the loss tests' world of one)."""
    model_parallel(1, 1)
