"""`glm3 serve`: an OpenAI-compatible HTTP server over the continuous-batching engine (glm3.runtime.engine).

protocol: the API's requests and their mapping onto ChatGLM3's conversation format; reply: generated tokens
as streamed text and OpenAI messages; engines: the engine for a model directory or a paged export; app: the
FastAPI routes; server: settings and running it with uvicorn.
"""
