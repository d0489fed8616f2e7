"""Training suite for image diffusion models: shared library."""
