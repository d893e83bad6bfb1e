"""Training: the loop, MSVP, datasets, torchrun/DDP, run directories and checkpoints."""
