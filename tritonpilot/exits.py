"""Exit statuses, the same for every subcommand."""

OK = 0
FAILURE = 1  # a runtime failure: Triton unreachable, a port taken, a run that could not finish
USAGE = 2  # a usage error or an invalid policy (argparse exits 2 for its own errors too)
INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT
