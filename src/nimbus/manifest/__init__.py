"""Manifests: load and validate app.yaml into :class:`AppSpec`."""
