"""Ray Tune search over fine-tuning settings and source models, exported to the registry."""
