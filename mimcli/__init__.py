"""mimcli: turn masked-image-modeling ViTs into encoders with strong off-the-shelf features."""

__version__ = "0.1.0"
