"""Chat and serving: the continuous-batching engine, the OpenAI-compatible server, the terminal chat, the web page."""
