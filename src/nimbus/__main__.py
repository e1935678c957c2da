"""``python -m nimbus``: the nimbus command line."""

from nimbus.cli.main import main

main()
