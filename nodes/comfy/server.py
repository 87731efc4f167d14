"""The ComfyUI server: the pack's example workflows listed in reading order.

ComfyUI serves each pack's workflows/ (or example_workflows/) as templates, listed by
``GET /workflow_templates`` in the order ``glob`` finds the files, which is the file system's
(19, 10, 08, 11, ... on ext4). Frontends up to 1.27 sorted the list; newer ones (1.58.1) show it as
served. This middleware sorts this pack's list (its files are numbered in reading order) and leaves
every other pack's entry as the server made it.
"""
from __future__ import annotations

import json
from pathlib import Path

_INSTALLED: set[int] = set()
TEMPLATE_PATHS = ("/workflow_templates", "/api/workflow_templates")


def sorted_templates(listing: dict, ours: set[str]) -> dict:
    """``listing`` ({pack folder: [workflow names]}) with every list made of exactly our workflow
    names sorted, each name once (the pack's folder name depends on how it was installed, its files
    do not; two copies of the pack under one folder name in two custom_nodes folders would list each
    name twice, though ComfyUI serves one of them)."""
    return {k: sorted(set(v)) if isinstance(v, list) and set(v) == ours else v for k, v in listing.items()}


def serve_templates_in_order(workflows_dir: Path) -> bool:
    """Adds the sorting middleware to ComfyUI's running PromptServer (once); False where there is no
    server (ComfyUI imported as a library, the tests' in-process host) or it has already started."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return False
    srv = getattr(PromptServer, "instance", None)
    app = getattr(srv, "app", None)
    if app is None or app.frozen:
        return False
    if id(app) in _INSTALLED:
        return True
    ours = {p.stem for p in Path(workflows_dir).glob("*.json")}

    @web.middleware
    async def inverse_templates_in_order(request, handler):
        response = await handler(request)
        if (request.method == "GET" and request.path in TEMPLATE_PATHS and isinstance(response, web.Response)
                and response.content_type == "application/json" and response.body is not None):
            try:
                listing = json.loads(response.body)
            except ValueError:
                return response
            if isinstance(listing, dict):
                return web.json_response(sorted_templates(listing, ours))
        return response

    app.middlewares.append(inverse_templates_in_order)
    _INSTALLED.add(id(app))
    return True
