"""The shapes world: a procedural toy world that proves MUMU learns, on a CPU."""
