# Kept for tasks/train_ensemble.py until its rewrite imports tasks.registry; then delete this file.
from tasks.registry.model import log_and_register  # noqa: F401
