"""`smolvlm-fast serve --ray`: the server's flags, the application on Ray Serve, until interrupted."""
from __future__ import annotations

import time

from ..serving.ray_caption import init_ray


def run(args, limits, llm_options: dict) -> int:
    """Serve args.model on args.replicas Engine replicas at args.host:args.port (Serve's proxy: on every node of
    the cluster, each on that port)."""
    ray = init_ray(args.ray_address, part="serve")
    from ray import serve

    from .app import build_app

    cpus = args.ray_cpus_per_replica or max(1, int(ray.cluster_resources().get("CPU", 1) // args.replicas))
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build_app(args.model, args.replicas, model_name=args.served_model_name, limits=limits,
                    cpus_per_replica=cpus, gpus_per_replica=args.ray_gpus_per_replica,
                    allowed_local_dir=args.allowed_local_dir, allow_remote_urls=args.allow_remote_urls,
                    allowed_domains=tuple(h.strip() for h in args.allowed_image_domains.split(",") if h.strip()),
                    **llm_options)
    serve.run(app, name="smolvlm", route_prefix="/")
    print(f"smolvlm-fast: serving on http://{args.host}:{args.port} with {args.replicas} replicas (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0
