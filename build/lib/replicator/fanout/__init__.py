"""Fan-out of badge states to open streams."""
