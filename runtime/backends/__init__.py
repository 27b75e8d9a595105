"""Backends execute pieces and own the cache buffers."""
