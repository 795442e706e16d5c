"""Job submission: CLI, job plan (DAG) and the one submitit launcher."""
