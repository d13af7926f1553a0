"""Training: the recipes (`recipes/`), the epoch loop they are made of (`trainer.py`), losses,
the optimiser and batch sampling."""
