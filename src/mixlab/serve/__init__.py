"""An OpenAI-compatible HTTP server over `mixlab.engine` (`mixlab serve`), with a chat page at `/`
that colours each generated token by the expert it was sent to (FastAPI + uvicorn; the `serve` extra).

    from mixlab.engine import Engine
    from mixlab.serve import ServerConfig, create_app, run_server
    with Engine(model, tok) as engine:
        run_server(create_app(engine, tok, ServerConfig(model_name="mini")), host="127.0.0.1", port=8000)
"""

from mixlab.serve.app import ServerConfig, create_app
from mixlab.serve.server import ServerThread, run_server

__all__ = ["ServerConfig", "ServerThread", "create_app", "run_server"]
