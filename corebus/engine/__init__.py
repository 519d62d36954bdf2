"""The engine: the Trainer and its parts (compiled step, packed-log layout, loops, hook dispatch, run
state), data input, the LR owner and the gradient pipeline."""
