"""Checkpoint formats: safetensors for fastdiff's own network files."""

from fastdiff.io.checkpoint import atomic_write, load_network, read_network_config, save_network

__all__ = ["save_network", "load_network", "read_network_config", "atomic_write"]
