"""The engine: the Trainer, its compiled step, data input, the LR owner and the gradient pipeline."""
