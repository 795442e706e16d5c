"""Pre-training: ``Trainer`` (the loop), ``CheckpointManager`` (atomic, resumable)."""
