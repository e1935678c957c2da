"""Safe rollouts: versions, aliases, traffic shifting and automatic rollback."""
