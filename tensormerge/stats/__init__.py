"""Per-model statistics (Fisher diagonals, Grams, Fisher blocks): the store and its importers."""
