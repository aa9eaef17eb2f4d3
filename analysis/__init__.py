"""pandas analysis of dml-study runs read back from MLflow (never imports torch)."""
