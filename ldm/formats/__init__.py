"""ldm.formats."""
