"""Process-group set-up. ``env`` reads the launcher's environment; ``deepspeed`` is the only
module that imports deepspeed."""
