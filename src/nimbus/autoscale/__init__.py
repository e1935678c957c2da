"""Autoscaling decisions: pure functions of samples and time."""
