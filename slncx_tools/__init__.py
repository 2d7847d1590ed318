"""slncx-tools: checkpoint, quantization and inference toolkit for SLNCX."""

__version__ = "0.1.0"
