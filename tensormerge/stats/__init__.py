"""Per-model statistics (Fisher diagonals, Grams, Fisher blocks): the store every statistics merge
reads, its binding to the models, and its importers. `stats compute` is tensormerge.stats_compute."""
