"""The identity of an input file as seen from outside: size, modification time and header.

A tomogram is done when its summary names the current model and this fingerprint, so a file
that is rewritten (same name, new data) is segmented again.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# The MRC header: it holds the shape, mode and voxel size, so a rewrite that changes any of
# them changes the fingerprint even when size and mtime happen to match.
from .volume import HEADER_BYTES


def input_fingerprint(path: str | os.PathLike[str]) -> str:
    """`size-mtime_ns-sha256(the header)[:16]`: cheap (one stat, one small read)."""
    path = Path(path)
    stat = path.stat()
    with path.open("rb") as handle:
        header_digest = hashlib.sha256(handle.read(HEADER_BYTES)).hexdigest()[:16]
    return f"{stat.st_size}-{stat.st_mtime_ns}-{header_digest}"
