"""Measured numbers: speed, overhead and quality, each as a ratio against a baseline run in the same process."""
