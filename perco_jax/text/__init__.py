"""Caption -> SD3 context: prompt encoding (`prompt`), the training-time embedding cache (`cache`)
and the precomputed embedding store (`store`)."""
