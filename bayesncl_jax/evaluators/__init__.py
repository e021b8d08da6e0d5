"""Evaluation protocols, one module per protocol (see `evaluate.py`)."""
