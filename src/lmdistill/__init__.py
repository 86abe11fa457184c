"""lmdistill: distill a large language model (teacher) into a smaller one (student)."""

__version__ = "0.1.0"
