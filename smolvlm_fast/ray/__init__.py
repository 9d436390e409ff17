"""The OpenAI server on Ray Serve (the `ray` extra): `smolvlm-fast serve --ray --replicas N`, or in Python

    from ray import serve
    from smolvlm_fast.ray import build_app
    serve.run(build_app("path/to/checkpoint", num_replicas=2, backend="numpy"), route_prefix="/")

    app.py     build_app: the Engine deployment (one LLM and the server's FastAPI app per replica) behind an Ingress
    router.py  the affinity key of a request (its images' hashes, its prompt's start) and the router that keeps a
               key on one replica
    cli.py     what `serve --ray` runs

Nothing is imported here, so that the package imports without Ray; build_app is imported on first use.
"""


def __getattr__(name):
    if name == "build_app":
        from .app import build_app
        return build_app
    raise AttributeError(name)
