"""The bus: hook specifications, the pluggy bus, the plugin registry, cadence, monitors and the logs hooks receive."""
