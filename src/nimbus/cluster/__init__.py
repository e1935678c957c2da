"""The region's control plane: node registry, leader, placement, demand, reconcile."""
