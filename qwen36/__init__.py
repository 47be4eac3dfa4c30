"""qwen36: an exact, readable, fast inference engine for Qwen3.6-35B-A3B (qwen3_5_moe)."""
from .checkpoint import CheckpointError
from .config import ConfigError
from .llm import LLM, Completion
from .sampling import SamplingParams

__all__ = ["LLM", "Completion", "SamplingParams", "CheckpointError", "ConfigError"]
__version__ = "0.1.0"
