"""Scoring a model on labelled data: metrics, reports and plots; and how far live traffic has
drifted from its validation data (drift.py)."""
