"""ldm.training."""
