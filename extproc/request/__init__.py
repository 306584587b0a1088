"""Reading an OpenAI-style request: its body, its model, and the errors we answer with."""
