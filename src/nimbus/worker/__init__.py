"""Node agent: starts instances from the zygote, supervises them, enforces limits."""
