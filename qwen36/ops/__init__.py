"""Stateless tensor functions. Each fast path has a plain reference beside it with the same signature."""
