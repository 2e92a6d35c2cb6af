"""The `mumu` subcommands, one module each with `add_arguments(parser)` and `run(args)`; `mumu_core.cli` lists them."""
