"""HTTP in, Lambda event out: routing, dispatch, error mapping."""
