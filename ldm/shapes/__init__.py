"""ldm.shapes."""
