"""The shapes world: a procedural toy world and a pixel evaluator for every mode."""
