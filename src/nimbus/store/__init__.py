"""Storage seams (Store, Blobs) and their backends, picked by name."""
