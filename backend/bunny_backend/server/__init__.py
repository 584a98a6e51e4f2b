"""bunny-serve: launching and watching tritonserver, and the OpenAI-compatible front (openai/)."""
