"""The nimbus command line."""
