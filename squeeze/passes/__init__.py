"""Passes: each transforms a model in place and returns per-layer records."""
