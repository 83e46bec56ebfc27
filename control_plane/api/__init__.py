"""HTTP layer: the FastAPI app, dependencies and error mapping."""
