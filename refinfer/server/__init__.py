"""`refinfer serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

Three layers, outermost first: `app.py` (routes, errors, the API key, metrics), then
`schemas.py` (the OpenAI wire format as pydantic models), then `engine_loop.py` (the one
thread that steps `decoding.batching.Engine`). It needs the `server` extra
(`pip install 'refinfer[server]'`: FastAPI, uvicorn); `import refinfer` never imports it.
"""

from refinfer.server.app import create_app, serve

__all__ = ["create_app", "serve"]
