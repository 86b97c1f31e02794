"""The ``postvault`` command line: one subcommand per admin task; user
mistakes become one-line errors and a non-zero exit, never a traceback."""
