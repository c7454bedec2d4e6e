"""Learned retention: gate modules and their shipped weights, and the training that fits them on generated tasks."""
