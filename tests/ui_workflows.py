"""UI-format (litegraph) twins of the API-format example workflows.

``python tests/ui_workflows.py`` regenerates workflows/*.json from workflows/api/*.json using the
node definitions of the real ComfyUI (COMFYUI_PATH). The tests convert every UI workflow back
with :func:`ui_to_api`, the way ComfyUI's frontend does when it queues a graph, and compare with
the API twin, so the two never drift apart.
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _inputs(node_cls) -> list[tuple[str, object, dict]]:
    spec = node_cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            typ = value[0]
            opts = value[1] if len(value) > 1 and isinstance(value[1], dict) else {}
            out.append((name, typ, opts))
    return out


def _is_widget(typ, opts) -> bool:
    return (isinstance(typ, list) or typ in WIDGET_TYPES) and not opts.get("forceInput", False)


def _widget_values(name, typ, opts, value) -> list:
    vals = [value]
    if opts.get("control_after_generate"):
        vals.append("fixed")
    if opts.get("image_upload"):
        vals.append("image")
    return vals


def _outputs(node_cls) -> list[tuple[str, str]]:
    types = list(getattr(node_cls, "RETURN_TYPES", ()) or ())
    names = list(getattr(node_cls, "RETURN_NAMES", None) or types)
    return list(zip(names, types))


def api_to_ui(prompt: dict, node_classes: dict) -> dict:
    ids = {k: i + 1 for i, k in enumerate(prompt)}
    # depth for a simple left-to-right layout
    depth: dict[str, int] = {}

    def d(k):
        if k not in depth:
            depth[k] = 0
            ups = [v[0] for v in prompt[k]["inputs"].values() if isinstance(v, list)]
            depth[k] = 1 + max((d(u) for u in ups), default=-1)
        return depth[k]

    for k in prompt:
        d(k)
    rows: dict[int, int] = {}
    links, nodes = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    for k, node in prompt.items():
        cls = node_classes[node["class_type"]]
        ui_inputs, widgets = [], []
        for name, typ, opts in _inputs(cls):
            value = node["inputs"].get(name)
            if _is_widget(typ, opts):
                if isinstance(value, list):
                    raise ValueError(f"node {k}: widget {name} driven by a link is not supported here")
                if value is None:
                    value = opts.get("default", typ[0] if isinstance(typ, list) and typ else None)
                widgets += _widget_values(name, typ, opts, value)
                continue
            link_id = None
            if isinstance(value, list):
                link_id = len(links) + 1
                src, slot = value[0], int(value[1])
                src_type = _outputs(node_classes[prompt[src]["class_type"]])[slot][1]
                links.append([link_id, ids[src], slot, ids[k], len(ui_inputs), src_type])
                out_links.setdefault((src, slot), []).append(link_id)
            ui_inputs.append({"name": name, "type": typ if isinstance(typ, str) else "COMBO", "link": link_id})
        col = depth[k]
        row = rows.get(col, 0)
        rows[col] = row + 1
        nodes.append({
            "id": ids[k], "type": node["class_type"], "pos": [40 + 360 * col, 40 + 240 * row],
            "size": [320, 60 + 26 * (len(ui_inputs) + len(widgets))], "flags": {}, "order": 0, "mode": 0,
            "inputs": ui_inputs, "outputs": [], "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": widgets, "title": node.get("_meta", {}).get("title", node["class_type"]),
            "_api_id": k,
        })
    order = sorted(prompt, key=lambda k: depth[k])
    for n in nodes:
        k = n.pop("_api_id")
        n["order"] = order.index(k)
        cls = node_classes[prompt[k]["class_type"]]
        n["outputs"] = [{"name": name, "type": typ, "links": out_links.get((k, i), []), "slot_index": i}
                        for i, (name, typ) in enumerate(_outputs(cls))]
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def ui_to_api(workflow: dict, node_classes: dict) -> dict:
    """What the frontend queues for a UI workflow (no converted widgets, no reroutes)."""
    by_id = {n["id"]: n for n in workflow["nodes"]}
    link_src = {l[0]: (str(l[1]), l[2]) for l in workflow["links"]}
    prompt = {}
    for n in workflow["nodes"]:
        if n.get("mode", 0) != 0:
            continue
        cls = node_classes[n["type"]]
        inputs = {}
        wv = list(n.get("widgets_values", []))
        sockets = {i["name"]: i for i in n.get("inputs", [])}
        for name, typ, opts in _inputs(cls):
            if _is_widget(typ, opts):
                inputs[name] = wv.pop(0)
                if opts.get("control_after_generate"):
                    wv.pop(0)
                if opts.get("image_upload"):
                    wv.pop(0)
            elif name in sockets and sockets[name]["link"] is not None:
                src, slot = link_src[sockets[name]["link"]]
                assert int(src) in by_id
                inputs[name] = [src, slot]
        if wv:
            raise ValueError(f"node {n['id']} ({n['type']}): {len(wv)} widget values left over")
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return prompt


def normalise_api(prompt: dict) -> dict:
    """Renumber an API prompt's nodes 1..N in file order, drop _meta (for comparisons)."""
    ids = {k: str(i + 1) for i, k in enumerate(prompt)}
    out = {}
    for k, node in prompt.items():
        inputs = {n: ([ids[v[0]], v[1]] if isinstance(v, list) else v) for n, v in node["inputs"].items()}
        out[ids[k]] = {"class_type": node["class_type"], "inputs": inputs}
    return out


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import comfy_host

    comfy_host.start_inprocess()
    import nodes

    for api_path in sorted((ROOT / "workflows" / "api").glob("*.json")):
        prompt = json.loads(api_path.read_text())
        ui = api_to_ui(prompt, nodes.NODE_CLASS_MAPPINGS)
        target = ROOT / "workflows" / api_path.name
        target.write_text(json.dumps(ui, indent=1) + "\n")
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
