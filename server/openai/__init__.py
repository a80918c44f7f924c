"""The OpenAI-compatible chat API: its wire format (protocol), serving class and route."""
