"""Eval stage: HellaSwag and lm-evaluation-harness on saved checkpoints, results into MLflow."""
