"""Converters that load foreign checkpoints (open_clip, ...) into clipdino models."""
