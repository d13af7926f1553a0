"""Ray Tune search over fine-tuning settings and source models (next milestone)."""
