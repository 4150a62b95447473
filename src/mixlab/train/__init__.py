"""Training: data preparation and loading (data.py), MoE losses (losses.py), the training loop
(loop.py), crash-safe checkpoints (checkpoints.py), sparse upcycling (upcycle.py)."""
