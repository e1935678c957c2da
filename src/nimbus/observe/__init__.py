"""Observability: invocation logs."""
