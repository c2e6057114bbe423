"""ldm.diffusion."""
