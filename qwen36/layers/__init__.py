"""Modules with weights. Parameter names equal the checkpoint's names (minus the text-model prefix)."""
