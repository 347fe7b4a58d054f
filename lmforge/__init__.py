"""lmforge: build a large language model end to end, from raw text to a served chat model."""

__version__ = "0.1.0"
