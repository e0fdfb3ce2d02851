"""Training: the sequence model, its tasks, the training loop and the gap-sweep experiment."""
