"""Lull's control plane: the idleness policy core, and later the controller and gateway."""
