"""The OpenAI-compatible server (`smolvlm-fast serve`), one job per module:

    limits.py    Limits: what one request may hold (standard library only: the CLI builds its flags from it)
    protocol.py  the request bodies, the unsupported fields, OpenAI's error body
    images.py    where an image_url may come from (data:, an allowed directory, public hosts), its checks
    metrics.py   the counters and gauges of GET /metrics
    api.py       the endpoints' work, request -> LLM.stream -> response
    app.py       create_app (the FastAPI app, its border middleware) and serve

Nothing is imported here, so that this package imports without fastapi (the `server` extra) or torch: import
smolvlm_fast.serving.server.app for create_app and serve.
"""
