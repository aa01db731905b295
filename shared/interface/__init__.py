"""The user-facing surfaces: command-line plumbing, sampling flags, prompts, the HTTP server."""
