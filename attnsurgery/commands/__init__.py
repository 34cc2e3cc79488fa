"""The ``attnsurgery`` subcommands, one module each (``add_parser(subparsers)`` + the function it runs); what they
share is in ``_common``. See :mod:`attnsurgery.cli` for the entry point."""
