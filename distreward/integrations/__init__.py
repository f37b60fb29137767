"""Bridges from a distreward reward model to other RL frameworks (docs/integrations.md).

Each submodule imports its framework only when imported itself: :mod:`distreward.integrations.trl` needs the
``trl`` extra (``pip install -e ".[trl]" --no-build-isolation``).
"""
