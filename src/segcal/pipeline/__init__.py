"""End-to-end pipelines built on the lower layers (prediction, fitting, evaluation)."""
