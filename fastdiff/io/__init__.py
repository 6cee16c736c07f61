"""Checkpoint formats: safetensors for fastdiff's own network files, and a safe importer (no code from the
file is run) for the official EDM2 network pickles, ``torch.save`` files and state dicts."""

from fastdiff.io.checkpoint import atomic_write, load_network, read_network_config, save_network
from fastdiff.io.edm2_pickle import (
    EDM2ImportError,
    UnsafePickleError,
    load_any_network,
    load_edm2_pickle,
    load_torch_file,
)

__all__ = [
    "save_network", "load_network", "read_network_config", "atomic_write",
    "load_edm2_pickle", "load_any_network", "load_torch_file", "UnsafePickleError", "EDM2ImportError",
]
