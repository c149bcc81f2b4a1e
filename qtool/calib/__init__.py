"""Calibration: observers that reduce activations batch by batch, range methods, the table."""
