"""`lmforge serve`: an OpenAI-compatible HTTP server over the inference engine, and the web chat
page. Needs the `serve` extra (`pip install 'lmforge[serve]'`): `lmforge.serve.app` says so when
FastAPI or uvicorn is missing."""


def create_app(*args, **kwargs):
    """See `lmforge.serve.app.create_app` (imported here lazily: FastAPI is an extra)."""
    from lmforge.serve.app import create_app

    return create_app(*args, **kwargs)
