"""Crash-proof checkpoints inside the trainers people use: Lightning, Hugging Face Trainer,
Accelerate and torch DCP. Each module imports its framework; ``import tensorkeep`` imports none."""
