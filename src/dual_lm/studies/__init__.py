"""Studies: the alpha x repetitions sweep, the demo, plots, held-out scoring and request files."""
