"""mimcli: turn masked-image-modeling ViTs into encoders with strong off-the-shelf features.

Kept light on purpose: importing ``mimcli`` imports no torch; the library lives in submodules.
"""

from mimcli._version import __version__

__all__ = ["__version__"]
