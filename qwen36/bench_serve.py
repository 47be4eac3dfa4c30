"""Moved to qwen36/tools/bench_serve.py."""
# moved to qwen36/tools/bench_serve.py; kept until importers are re-pointed
from .tools.bench_serve import *  # noqa: F401,F403
