"""One module per `dist-cardio` subcommand: `configure(parser)` and `run(args) -> int`."""
