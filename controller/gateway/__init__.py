"""The gateway: Lull's OpenAI-compatible REST ingress (a Ray Serve deployment) and its request router."""
