"""detox: detoxify LLMs by editing their weights, and serve the versions."""

__version__ = "0.1.0"
