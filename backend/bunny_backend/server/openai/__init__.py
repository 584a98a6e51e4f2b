"""The OpenAI-compatible HTTP front (docs/api/openai.md): FastAPI over Triton's gRPC; the model runs in Triton."""
