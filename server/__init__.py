"""kiln's gateway: the Ollama and OpenAI dialects, scheduling and metrics."""
