"""qwen36: an exact, readable, fast inference engine for Qwen3.6-35B-A3B (qwen3_5_moe)."""
from .chat import ChatTemplateError, render_chat
from .checkpoint import CheckpointError
from .config import ConfigError
from .engine import EngineConfig
from .llm import LLM, Completion
from .ops.backend import ComputeConfig
from .parsers import AssistantStreamParser, ChatResult, parse_assistant
from .sampling import SamplingParams

__all__ = ["LLM", "EngineConfig", "ComputeConfig", "Completion", "SamplingParams", "render_chat", "ChatResult", "parse_assistant",
           "AssistantStreamParser", "CheckpointError", "ConfigError", "ChatTemplateError"]
__version__ = "0.1.0"
