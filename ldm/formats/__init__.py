"""Weight formats: the names of original Stable Diffusion (CompVis) files, and reading and writing
those single files."""
