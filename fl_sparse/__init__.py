"""fl_sparse: sparse federated learning composed from gin-registered parts.

Start reading at `fl_sparse/interfaces.py` (the parts) and `algorithms/pffdst.gin` (one composition).
"""
from importlib import metadata

try:
    __version__ = metadata.version("fl-sparse")
except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
