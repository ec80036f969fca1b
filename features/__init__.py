"""gapstack features: backbone registry, image loading and cached GAP feature extraction."""

__version__ = "0.1.0"
