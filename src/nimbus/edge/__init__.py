"""The edge: one HTTP front over several regions (health, routing policy,
retries across regions, connection pools to every gateway)."""
