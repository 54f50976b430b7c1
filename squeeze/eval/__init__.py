"""Evaluation: runtimes, metrics and reports."""
