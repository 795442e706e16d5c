"""Evaluations of a pre-trained run directory. Each module has ``main(run_dir, dataset,
baseline, label)`` (the job entry); which ones run after pre-training is the config's ``evals``."""
EVALUATIONS: dict[str, str] = {
    "knn": "evaluation.knn:main",
    "linear_probe": "evaluation.linear_probe:main",
    "fewshot": "evaluation.fewshot:main",
    "finetune": "evaluation.finetune:main",
    "segmentation": "evaluation.segmentation:main",
    "detection": "evaluation.detection:main",
    "diagnostics": "evaluation.diagnostics:main",
}
