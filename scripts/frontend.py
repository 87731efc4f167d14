"""ComfyUI's real frontend in a headless browser, for the UI workflow tests and the generator.

A ComfyUI server (the host of tests/support/comfy_host.py, this pack, the tiny checkpoint, the example
input photo) is started on 127.0.0.1, and Debian's Chromium is driven by Playwright for Python
(Playwright's own browser download cannot work offline, so the system executable is used:
``CHROMIUM`` or the first of /usr/bin/chromium, chromium-browser, google-chrome on PATH).

Everything the tests learn comes from the frontend itself: ``app.loadGraphData`` loads a UI
workflow, ``LiteGraph.registered_node_types`` says which node types exist, each widget's own
``options`` say which values are valid, ``app.graph.links`` holds the links that survived,
``app.graphToPrompt()`` is what the frontend queues and ``app.queuePrompt`` queues it.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

VIEWPORT = {"width": 1440, "height": 900}  # a common laptop screen: the default view must fit it
BLOCK_STEP = 10
# widgets the frontend adds to show outputs (newer frontends: Preview Any's text and its plain/markdown toggle)
DISPLAY_ONLY = ("$$canvas-image-preview", "preview", "preview_text", "preview_mode")
NOT_VALUES = ("control_after_generate", "upload", "$$canvas-image-preview")
# The frontends the browser tests run: the one ComfyUI pins (1.27.10 for 0.3.64) and the newest
# comfyui-frontend-package on the package index when this was last checked (``pip index versions
# comfyui-frontend-package``); scripts/provision.py installs it into the cache folder.
PINNED = "pinned"
NEWEST = "1.58.1"
FRONTENDS = (PINNED, NEWEST)


def frontend_root(version: str) -> Path | None:
    """The folder ComfyUI's ``--front-end-root`` serves for ``version``: None for the pinned one (the
    comfyui-frontend-package that ComfyUI's requirements.txt pins, installed in its Python), else the
    package unpacked in the cache folder by ``scripts/provision.py --deps test``."""
    if version == PINNED:
        return None
    import provision  # scripts/, beside this file

    return provision.frontend_dir(version) / "comfyui_frontend_package" / "static"


def find_chromium() -> str | None:
    for cand in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if cand and Path(cand).is_file():
            return cand
    return None


def missing_reason(version: str = PINNED) -> str | None:
    """Why the browser tests cannot run here (on frontend ``version``), or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return ("Playwright for Python is not installed (pip install playwright; scripts/test.sh installs it "
                "from requirements-test.txt)")
    if find_chromium() is None:
        return ("no Chromium found (set CHROMIUM, or install Debian's chromium: apt-get install chromium; "
                "scripts/test.sh does this when it runs as root with apt-get)")
    root = frontend_root(version)
    if root is not None and not (root / "index.html").is_file():
        return (f"comfyui-frontend-package {version} is not in {root.parents[1]} (python scripts/provision.py "
                f"--deps test installs it from the package index; scripts/test.sh runs that)")
    return None


_SNAPSHOT_JS = """() => {
  const g = window.app.graph;
  const reg = window.LiteGraph.registered_node_types;
  const links = g.links instanceof Map ? [...g.links.values()] : Object.values(g.links || {});
  const ds = window.app.canvas.ds;
  const rect = window.app.canvasEl.getBoundingClientRect();
  const num = v => (typeof v === 'string' && /^-?\\d+$/.test(v)) ? Number(v) : v;  // newer frontends: string ids
  return {
    scale: ds.scale, offset: [ds.offset[0], ds.offset[1]],
    canvas: [rect.left, rect.top, rect.width, rect.height],
    links: links.filter(l => l).map(l => ({id: num(l.id), origin_id: num(l.origin_id), origin_slot: l.origin_slot,
                                            target_id: num(l.target_id), target_slot: l.target_slot, type: l.type})),
    groups: (g._groups || g.groups || []).map(gr => ({title: gr.title, bounding: [...gr._bounding || gr.bounding]})),
    nodes: g._nodes.map(n => ({
      id: num(n.id), type: n.type, title: n.title, registered: !!reg[n.type], mode: n.mode,
      bounding: [...n.getBounding()], pos: [...n.pos], size: [...n.size], min_size: [...n.computeSize()],
      inputs: (n.inputs || []).map(i => ({name: i.name, link: num(i.link), widget: !!i.widget})),
      outputs: (n.outputs || []).map(o => ({name: o.name, links: o.links ? o.links.map(num) : []})),
      widgets: (n.widgets || []).map(w => ({name: w.name, type: w.type, value: w.value,
        values: Array.isArray(w.options?.values) ? [...w.options.values] : null,
        min: w.options?.min ?? null, max: w.options?.max ?? null})),
    })),
  };
}"""


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


def _post(url: str, data) -> None:
    req = urllib.request.Request(url, data=json.dumps(data).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).read()


class Frontend:
    """One browser page on one ComfyUI server."""

    def __init__(self, url: str, page):
        self.url = url
        self.page = page
        self.console_errors: list[str] = []
        page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.console_errors.append(f"pageerror: {e}"))

    def open(self) -> None:
        # a first visit shows the template browser and the tutorial: mark them seen for this user
        _post(f"{self.url}/api/settings/Comfy.TutorialCompleted", True)
        self.page.goto(self.url)
        self.page.wait_for_function("window.app && window.app.graph && window.app.canvas && window.LiteGraph",
                                    timeout=120_000)
        self.page.wait_for_timeout(1000)
        self.close_dialogs()

    def close_dialogs(self) -> list[str]:
        """Closes every open dialog and error card; returns their texts. (The pinned frontend names
        missing models in a dialog; newer ones in an error card over the canvas's top right.) Read
        and closed in one page script per round, so a dialog closing itself meanwhile is no error."""
        texts = []
        for _ in range(8):
            found = self.page.evaluate("""() => {
              const shown = (e) => e.getClientRects().length > 0 && getComputedStyle(e).visibility !== 'hidden';
              const dialogs = [...document.querySelectorAll('.p-dialog, [role=dialog]')].filter(shown);
              if (dialogs.length) return {kind: 'dialog', texts: dialogs.map(e => e.innerText)};
              const cards = [...document.querySelectorAll('[data-testid="error-overlay"]')].filter(shown);
              for (const c of cards) c.querySelector('[data-testid="error-overlay-dismiss"]')?.click();
              return {kind: cards.length ? 'card' : null, texts: cards.map(e => e.innerText)};
            }""")
            if found["kind"] is None:
                break
            texts += found["texts"]
            if found["kind"] == "dialog":  # modal dialogs first: their overlay takes the clicks
                self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(300)
        return texts

    def load(self, workflow: dict) -> list[str]:
        """Loads a UI workflow the way opening its file does; returns the texts of the dialogs the
        frontend showed (missing nodes, missing models)."""
        self.page.evaluate("async (wf) => { await window.app.loadGraphData(wf, true, true, null) }", workflow)
        self.page.wait_for_timeout(600)
        return self.close_dialogs()

    def set_setting(self, name: str, value) -> None:
        """Sets a frontend setting as its settings dialog does (stored for this user on the server)."""
        self.page.evaluate("async ([n, v]) => { await window.app.extensionManager.setting.set(n, v) }", [name, value])
        self.page.wait_for_timeout(500)

    def vue_node_count(self) -> int:
        """How many nodes the frontend draws as Vue components ("Nodes 2.0"), not on the canvas."""
        return self.page.evaluate("() => document.querySelectorAll('[data-node-id]').length")

    def template_titles(self, category: str) -> list[str]:
        """The card titles the template browser shows under ``category`` (a pack's folder name), in
        the order shown: opened with the frontend's own command, as the Templates button does."""
        self.page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        self.page.wait_for_timeout(2000)
        try:
            self.page.get_by_text(category, exact=True).first.click()
            self.page.wait_for_timeout(1500)
            return self.page.evaluate("""() => [...document.querySelectorAll('.p-dialog *, [role=dialog] *')]
              .filter(e => e.children.length === 0).map(e => (e.innerText || '').trim()).filter(t => t)""")
        finally:
            self.close_dialogs()

    def canvas_rect(self) -> list[float]:
        return self.page.evaluate("() => { const r = window.app.canvasEl.getBoundingClientRect(); "
                                  "return [r.left, r.top, r.width, r.height] }")

    def blocked_cells(self, step: int = BLOCK_STEP) -> list[list[int]]:
        """The page cells (step x step px, top-left corners) over the canvas that the frontend's
        own panels cover (workflow tabs, minimap, zoom buttons...), measured on an empty graph:
        where document.elementFromPoint is not the canvas."""
        self.load({"last_node_id": 0, "last_link_id": 0, "nodes": [], "links": [], "groups": [],
                   "config": {}, "extra": {}, "version": 0.4})
        return self.page.evaluate("""(step) => {
          const c = window.app.canvasEl, r = c.getBoundingClientRect(), out = [];
          for (let y = Math.ceil(r.top); y < r.bottom; y += step)
            for (let x = Math.ceil(r.left); x < r.right; x += step) {
              const e = document.elementFromPoint(x + step / 2, y + step / 2);
              if (e !== c) out.push([x, y]);
            }
          return out;
        }""", step)

    def low_quality_below(self) -> float:
        """The zoom below which the canvas stops drawing text (LiteGraph's level of detail)."""
        return self.page.evaluate("() => window.app.canvas.low_quality_zoom_threshold ?? window.app.canvas._lowQualityZoomThreshold")

    def snapshot(self) -> dict:
        return self.page.evaluate(_SNAPSHOT_JS)

    def graph_to_prompt(self) -> dict:
        return self.page.evaluate("async () => (await window.app.graphToPrompt()).output")

    def queued_prompt(self) -> dict:
        """graphToPrompt's output as the server reads it: class_type and inputs, without the
        inputs the node does not declare (the frontend sends PreviewAny's display widget, which
        the server ignores)."""
        if not hasattr(self, "_info"):
            self._info = _get(f"{self.url}/api/object_info")
        out = {}
        for k, v in self.graph_to_prompt().items():
            spec = self._info[v["class_type"]]["input"]
            declared = set(spec.get("required", {})) | set(spec.get("optional", {}))
            out[k] = {"class_type": v["class_type"], "inputs": {n: x for n, x in v["inputs"].items() if n in declared}}
        return out

    def set_widgets(self, values: dict) -> None:
        """values: {node id: {widget name: value}}, set through the widgets as a user would."""
        missing = self.page.evaluate("""(values) => {
          const missing = [];
          for (const [id, ws] of Object.entries(values)) {
            const n = window.app.graph.getNodeById(Number(id));
            for (const [name, v] of Object.entries(ws)) {
              const w = n && (n.widgets || []).find(w => w.name === name);
              if (!w) { missing.push(`${id}.${name}`); continue; }
              w.value = v;
              if (w.callback) w.callback(v);
            }
          }
          window.app.graph.setDirtyCanvas(true, true);
          return missing;
        }""", values)
        if missing:
            raise AssertionError(f"no such widgets in the loaded graph: {missing}")

    def replace_node(self, node_id: int, node_type: str) -> None:
        """Puts a node of ``node_type`` in the place of a node (same id, position, widget values by
        name, outgoing links; for loaders, which have no linked inputs), as a user would swap it."""
        got = self.page.evaluate("""({id, type}) => {
          const g = window.app.graph, old = g.getNodeById(id);
          const link = (lid) => g.links instanceof Map ? g.links.get(lid) : g.links[lid];
          const outs = [];
          (old.outputs || []).forEach((o, slot) => (o.links || []).forEach(lid => {
            const l = link(lid); outs.push([slot, l.target_id, l.target_slot]); }));
          const values = Object.fromEntries((old.widgets || []).map(w => [w.name, w.value]));
          const pos = [...old.pos];
          g.remove(old);
          const n = window.LiteGraph.createNode(type);
          n.id = id; n.pos = pos;
          g.add(n);
          for (const w of n.widgets || []) if (w.name in values) w.value = values[w.name];
          for (const [slot, target, targetSlot] of outs) n.connect(slot, g.getNodeById(target), targetSlot);
          g.setDirtyCanvas(true, true);
          return [Number(n.id), n.type];
        }""", {"id": node_id, "type": node_type})
        if got != [node_id, node_type]:
            raise AssertionError(f"replacing node {node_id} by a {node_type} gave {got}")

    def queue(self, timeout: float = 600) -> dict:
        """Queues the loaded graph through the frontend (the Queue button's app.queuePrompt) and
        waits for the server's verdict; returns the history entry."""
        before = set(_get(f"{self.url}/api/history"))
        errors = self.page.evaluate("async () => { await window.app.queuePrompt(0, 1); return window.app.lastNodeErrors }")
        if errors:
            raise AssertionError(f"the server refused the prompt the frontend queued: {errors}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            new = {k: v for k, v in _get(f"{self.url}/api/history").items() if k not in before}
            for entry in new.values():
                if entry.get("status", {}).get("completed") or entry.get("status", {}).get("status_str") == "error":
                    return entry
            time.sleep(0.5)
        raise AssertionError(f"the queued workflow did not finish within {timeout} s")

    def screenshot(self, path: Path, **kw) -> None:
        self.page.wait_for_timeout(300)
        self.page.screenshot(path=str(path), **kw)


class FrontendSession:
    """A server with this pack, the tiny checkpoint (and ``extra_nodes`` folders of custom nodes, with
    ``env`` added to the server's environment, e.g. the PYTHONPATH their imports need), and a browser
    page on it (context manager)."""

    def __init__(self, comfy_dir: Path, checkpoints: Path, inputs: Path, extra_nodes: tuple = (),
                 env: dict | None = None, version: str = PINNED):
        import run_workflow  # scripts/, beside this file

        self._rw = run_workflow
        root = frontend_root(version)
        args = [] if root is None else ["--front-end-root", str(root)]
        self.version = version
        self.local = run_workflow.LocalComfy(comfy_dir, checkpoints, True, args, env=env, extra_nodes=extra_nodes)
        self.inputs = inputs

    def __enter__(self) -> Frontend:
        from playwright.sync_api import sync_playwright

        for f in self.inputs.iterdir():
            shutil.copy(f, self.local.tmp / "input" / f.name)
        try:
            self._rw.start_local_servers([self.local], 120)
            self._pw = sync_playwright().start()
            self._browser = self._pw.chromium.launch(
                executable_path=find_chromium(), headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                      "--no-first-run", "--disable-extensions"])
            page = self._browser.new_page(viewport=VIEWPORT)
            fe = Frontend(self.local.url, page)
            fe.open()
            return fe
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def __exit__(self, *exc) -> None:
        for closer in (lambda: self._browser.close(), lambda: self._pw.stop()):
            try:
                closer()
            except Exception:
                pass
        self.local.stop()
