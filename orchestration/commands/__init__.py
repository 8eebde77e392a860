"""The orchestration side of the `sftkey` CLI: commands that need Dagster, MLflow or DVC."""
