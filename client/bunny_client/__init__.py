"""bunny_client: gRPC client jobs against the Triton model `bunny`."""
