"""The HTTP API (`continuum serve`): FastAPI routes over the same service layer as the CLI."""
