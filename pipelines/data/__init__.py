"""Data sets -> one manifest: label-file adapters (``adapters``), the manifest contract
(``manifest``), the demo generator (``demo``). Import the module you need: the package imports
nothing, so a stage that reads a manifest does not load the adapters or the demo generator."""
