"""Datasets with per-sample sigma_min, corruptions, input pipelines (DALI and torch)."""
