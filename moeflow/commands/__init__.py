"""CLI subcommands that drive the engine directly (generate, inspect)."""
