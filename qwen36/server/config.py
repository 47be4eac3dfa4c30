"""The server's settings (`qwen36 serve`'s options): what the routes, the limits and the chat core read."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_body_bytes: int = 32 << 20
    default_chat_template_kwargs: dict | None = None
    allowed_local_media_path: str | None = None   # file:// media URLs allowed inside this directory only
    max_image_pixels: int | None = None           # caps on the pixel budgets (the vision tower's cost)
    max_video_pixels: int | None = None
    background_prefill: bool = True               # prefill the next turn's history while idle (prefix cache)
    responses_store_size: int = 256               # /v1/responses kept for previous_response_id (LRU)
    responses_store_bytes: int = 64 << 20         # and the bytes they may hold (media are not stored)
    limit_images: int | None = None               # media items per request (--limit-mm-per-prompt)
    limit_videos: int | None = None
    max_waiting: int | None = 256                 # engine requests in line behind the running ones, then 429
    media_workers: int = 2                        # threads decoding media and running the tower
    media_queue: int = 8                          # media requests in flight (running or waiting) before 429
    request_timeout: float = 60.0                 # seconds to receive a request's body
    allowed_hosts: tuple[str, ...] = ()           # Host names accepted besides loopback (keyless loopback server)
    host: str = "127.0.0.1"                       # the address the server listens on
