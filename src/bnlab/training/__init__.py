"""The training core: configuration, the one training loop, evaluation and the run store."""
