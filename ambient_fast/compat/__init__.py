"""Drop-in compatibility layer for EDM / Ambient-o / Ambient Dataloops codebases."""
