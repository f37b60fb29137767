"""Test-wide settings: the Triton interpreter (no GPU here) and no network for Hugging Face.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, hence at import time here.
"""
import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded tiny tokenizer, built once per test module."""
    from distreward.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()
