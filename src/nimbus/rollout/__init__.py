"""Safe rollouts: versions, aliases and traffic splitting."""
