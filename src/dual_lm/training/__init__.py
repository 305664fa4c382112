"""Training: the dual objective, Muon + AdamW, distributed set-up, checkpoints, the metrics file and the run loop."""
