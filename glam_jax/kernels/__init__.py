"""Accelerator-specific kernels; each falls back cleanly where its hardware is absent."""
