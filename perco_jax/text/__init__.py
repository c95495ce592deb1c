"""Caption -> SD3 context: prompt encoding (`prompt`), the training-time embedding cache (`cache`),
the precomputed embedding store (`store`) and the tiny preset's offline tokenizers (`tiny_tokenizers`)."""
