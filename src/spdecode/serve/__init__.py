"""`spdecode serve`: an OpenAI-compatible HTTP server over any decoding method (serve/app.py), fed
one request at a time by an engine thread (serve/engine.py) that owns the model or the pipeline."""
