"""Fake vLLM server for tests, benchmarks and GPU-less demos.

Run it with ``python -m fakevllm --port 0``; embed it with ``make_app()``.
Answers are instant unless a load model is asked for (``python -m fakevllm
--help``, ``make_app(load=LoadConfig(...))``; see engine.py).
"""

from .app import make_app
from .engine import LoadConfig

__all__ = ["make_app", "LoadConfig"]
