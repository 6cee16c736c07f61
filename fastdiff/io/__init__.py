"""Network files: fastdiff's own format (safetensors, ``fastdiff.io.network_file``), a restricted unpickler that
reads pickles and ``torch.save`` files without running any code from them and with bounded allocation
(``fastdiff.io.safe_pickle``), and the import of the official EDM2 networks through it
(``fastdiff.io.edm2_pickle``). ``load_any_network`` (``fastdiff.io.any_network``) reads any of these: it
is what every ``--net`` takes."""

from fastdiff.io.any_network import load_any_network, load_network_and_info
from fastdiff.io.edm2_pickle import EDM2ImportError, load_edm2_pickle
from fastdiff.io.network_file import atomic_write, load_network, read_network_config, save_network
from fastdiff.io.safe_pickle import (
    MalformedPickleError,
    PickleLimitError,
    SafePickleError,
    UnsafePickleError,
    load_torch_file,
)

__all__ = [
    "save_network", "load_network", "read_network_config", "atomic_write",
    "load_edm2_pickle", "load_any_network", "load_network_and_info", "load_torch_file", "SafePickleError",
    "UnsafePickleError", "MalformedPickleError", "PickleLimitError", "EDM2ImportError",
]
