"""bunny_backend: the Bunny VLM serving engine (model, paged KV cache, continuous batching)."""
