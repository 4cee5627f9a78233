"""Developer tools (not imported by the library): code deps from imports, the reproduction check."""
