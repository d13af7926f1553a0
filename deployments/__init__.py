"""Ray Serve application of TransferDesk: serves a registry model over HTTP (see app.py)."""
