"""Moved to qwen36/tools/fuzz.py."""
# moved to qwen36/tools/fuzz.py; kept until importers are re-pointed
from .tools.fuzz import *  # noqa: F401,F403
