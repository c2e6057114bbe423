"""ldm.nn."""
