"""tomolive: live segmentation of cryo-electron tomograms.

The science lives in :mod:`tomolive.core` (pure functions on arrays); the service and the
command line live in :mod:`tomolive.daemon` (wiring only).
"""

import os

# OpenMP threads that spin while waiting make PyTorch's CPU inference 3-4x slower on machines
# whose cores are shared (measured: 17.6 vs 59 GFLOP/s on 2 cores). It must be set before torch
# is imported, which is why it lives here; a value set by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
