"""What hosts the model: the model process, its pipeline, preprocessing workers and shared arenas."""
