"""The `transferdesk` command line, on top of the core: `main.py` (train, evaluate, predict,
export, data check, models), `review.py` (the review loop) and `flags.py` (settings as flags)."""
