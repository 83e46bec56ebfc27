"""Fleet simulator."""
