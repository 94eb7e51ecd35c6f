"""Training side: the synthetic MS/NMOSD cohort simulator, splits and the training loop."""
