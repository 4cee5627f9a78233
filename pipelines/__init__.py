"""The importable library: one package per concern (see the README, "Architecture")."""
