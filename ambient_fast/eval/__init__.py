"""Evaluation: Frechet distances (FID with pytorch-fid Inception, and the demo feature space)."""
