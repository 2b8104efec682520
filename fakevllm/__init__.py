"""Fake vLLM server for tests, benchmarks and GPU-less demos.

Run it with ``python -m fakevllm --port 0``; embed it with ``make_app()``.
"""

from .app import make_app

__all__ = ["make_app"]
