"""Training drafters: recipes, data, objectives and the accelerate loop."""
