"""The peer comparison: vLLM CPU beside bunny-serve on the same weights (`./build.sh bench --peer vllm`)."""
