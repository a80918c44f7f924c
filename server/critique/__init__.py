"""The critique and revise API: its wire format (protocol), the pipeline over the engine, serving class and routes."""
