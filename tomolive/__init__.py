"""tomolive: live segmentation of cryo-electron tomograms.

The science lives in :mod:`tomolive.core` (pure functions on arrays); the service and the
command line live in :mod:`tomolive.daemon` (wiring only).
"""

__version__ = "0.1.0"
