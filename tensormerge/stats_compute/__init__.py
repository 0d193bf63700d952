"""`tensormerge stats compute`: a model run over data to accumulate its merge statistics.

Apart from `tensormerge.stats` (the store every statistics merge reads, and its binding to the
models) because it needs `transformers` and a forward and backward pass per example, and a
merge needs neither."""
