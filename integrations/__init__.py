"""MLOps sinks (TensorBoard, MLflow, W&B). Each imports its SDK only when enabled."""
