"""Scoring a model on labelled data: metrics, reports and plots."""
