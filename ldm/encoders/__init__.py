"""ldm.encoders."""
