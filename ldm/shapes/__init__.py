"""The default model's world: procedural shapes with captions, a rule-based detector that scores
generated images, and the experiments behind docs/theory.md."""
