"""MLflow tracking (placeholder until the tracking step lands)."""
