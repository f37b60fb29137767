"""Test-wide settings: the Triton interpreter (no GPU here) and no network for Hugging Face.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, hence at import time here.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
