"""Running leadflow: the service, workers, CLI, demo, config loading."""
