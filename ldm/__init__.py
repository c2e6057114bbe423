"""ldm: conditional text-to-image latent diffusion."""

__version__ = "0.1.0"
