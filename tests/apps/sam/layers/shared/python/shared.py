NAME = "shared-layer"
