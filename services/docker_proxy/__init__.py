"""The Docker API proxy: the only holder of dockerd's socket in the compose stack."""
