"""One module per subcommand: `add_parser(subparsers)` builds its options from light imports only, and
`run(args) -> int` imports the library it drives, so that `--help` and argument errors answer at once."""
