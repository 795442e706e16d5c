"""The one training loop (``loop.TrainLoop``) with its tasks: pre-training (``trainer``) and,
in evaluation/, the trained evaluations; ``CheckpointManager`` (atomic, resumable)."""
