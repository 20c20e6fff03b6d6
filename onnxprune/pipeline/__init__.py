"""The pipeline's stages, one module each (moved here as they change; see ARCHITECTURE.md)."""
