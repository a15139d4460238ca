"""Test-only PyTorch restatements of official models, for equality checks."""
