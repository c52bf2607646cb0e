"""Benchmarks pulled offline from pinned PyPI wheels: sources, converters, item format."""
