"""MLflow runs, the model registry and the served scoring models."""
