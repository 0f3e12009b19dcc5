"""Pretraining objectives: each one wraps model(s) and loss(es) and returns a dict of losses and metrics."""
