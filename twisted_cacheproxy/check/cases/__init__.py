"""The cases, one module per group of the catalogue."""
