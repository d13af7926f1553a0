"""Ray Serve application serving registry models (next milestone: see the issue tracker)."""
