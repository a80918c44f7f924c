"""Health, metrics, the model listing and the constitutions being served."""
