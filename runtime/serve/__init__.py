"""``python -m runtime.serve``: the OpenAI-compatible HTTP server (command line in ``cli``, request
shapes in ``api``, FastAPI routes in ``app``, the one worker thread that owns the Assistant in ``worker``).
"""
