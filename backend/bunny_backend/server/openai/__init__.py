"""The OpenAI-compatible HTTP front (CONTRACT.md section 5): FastAPI over Triton's gRPC; the model runs in Triton."""
