"""Evaluation harness (linear probe, kNN, zero-shot, embedding analysis) -- see docs/architecture.md."""
