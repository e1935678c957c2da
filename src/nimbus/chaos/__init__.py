"""``nimbus chaos``: steady load through the edge while processes of the
regions are killed in turn, then an availability report."""
