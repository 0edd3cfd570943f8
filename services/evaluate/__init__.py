"""Offline evaluation: baselines and retrieval/probe metrics."""
