"""The version of segcal (a module of its own so the command line can print it without torch)."""

__version__ = "0.1.0"
