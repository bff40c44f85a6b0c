"""Device profiles and the memory budget."""
