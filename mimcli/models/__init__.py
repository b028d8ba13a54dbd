"""Loading MIM encoders from any source, converting checkpoints, and tapping their blocks."""
