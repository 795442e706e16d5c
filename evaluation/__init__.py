"""Evaluations of a pre-trained run directory. Each module has ``main(run_dir)`` (the job entry)
and a function that takes an encoder, so it can be reused without a run directory."""
EVALUATIONS: dict[str, str] = {
    "knn": "evaluation.knn:main",
    "linear_probe": "evaluation.linear_probe:main",
}
