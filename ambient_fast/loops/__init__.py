"""Training, annotation and the Ambient Dataloops orchestrator."""
