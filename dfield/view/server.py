"""`dfield view`: trained runs in the browser through viser (the viewer library nerfstudio uses).

The browser sends its camera; a ProgressiveRenderer per client renders it (coarse while it moves, full size once it
rests) and the frame is shown as the scene's background image. Clicks, boxes and texts go to the run's
ViewerSession, which builds the query and the edits; only a change of camera or scene renders again, a new query
or display mode re-colours the last frame.

    viewer = Viewer(["runs/toy"], port=8080)   # serves http://127.0.0.1:8080
    viewer.wait()                              # until Ctrl-C
"""

from __future__ import annotations

import threading
import time
import traceback
from pathlib import Path

import numpy as np

from dfield.errors import DfieldError, RunError
from dfield.fields.vm import VMVolume, compile_kernels
from dfield.view.camera import ViewCamera
from dfield.view.frames import MODES, Frame
from dfield.view.progressive import ProgressiveRenderer
from dfield.view.session import ViewerSession

CLICK_ACTIONS = ("add positive", "add negative", "pick cluster", "off")


def _viser():
    try:
        import viser  # optional: only the viewer needs it
    except ImportError:
        raise RunError("the viewer needs viser: pip install 'dfield[viewer]' (scripts/setup.sh installs it)") from None
    return viser


class _Client:
    """What the viewer keeps per browser tab: its renderer, the last frame shown and when it was shown."""

    def __init__(self, handle, renderer: ProgressiveRenderer):
        self.handle, self.renderer = handle, renderer
        self.frame: Frame | None = None  # the last frame shown (any level)
        self.full: Frame | None = None  # the last frame of the finest level
        self.connected = time.perf_counter()
        self.first_frame_s: float | None = None
        self.shown = 0
        self.last_image: np.ndarray | None = None


class Viewer:
    """A viser server showing one or more runs (folders or ViewerSessions; a dropdown switches between them, the
    camera stays): render modes, click/box/text queries, clusters, edits and saving. Binds to 127.0.0.1 unless
    `host` says otherwise."""

    def __init__(self, runs, host: str = "127.0.0.1", port: int = 8080, levels: tuple[int, ...] = (64, 256),
                 device: str = "cpu", verbose: bool = True, compile: bool = False):
        viser = _viser()
        if not runs:
            raise RunError("dfield view needs at least one run folder")
        self.sessions = [r if isinstance(r, ViewerSession) else ViewerSession(Path(r), device) for r in runs]
        self.active = 0
        self.levels = tuple(levels)
        self.mode = "rgb"
        self.click_action = CLICK_ACTIONS[0]
        self.verbose = verbose
        self.errors: list[str] = []
        self.clients: dict[int, _Client] = {}
        self._prepared: set[ViewerSession] = set()
        # Compiled read kernels (dfield.fields.vm.compile_kernels): "off", "compiling", "on", or why not.
        self.kernels = "compiling" if compile else "off"
        self._compile_started = not compile
        self._lock = threading.Lock()
        self.server = viser.ViserServer(host=host, port=port, label="dfield", verbose=False)
        self.host, self.port = host, self.server.get_port()
        s = self.session
        self.server.scene.set_up_direction(tuple(float(v) for v in s.up()))
        home = s.home()
        init = self.server.initial_camera
        init.position = home.position
        init.look_at = tuple(float(v) for v in s.center())
        init.up = tuple(float(v) for v in s.up())
        init.fov = home.fov_y
        self._build_gui()
        self.server.on_client_connect(self._connect)
        self.server.on_client_disconnect(self._disconnect)
        self.server.scene.on_click()(lambda e: self._click(e, negative=False))
        self.server.scene.on_click(modifier="shift")(lambda e: self._click(e, negative=True))
        self.server.scene.on_rect_select(modifier="cmd/ctrl")(lambda e: self._box(e, negative=False))
        self.server.scene.on_rect_select(modifier="cmd/ctrl+shift")(lambda e: self._box(e, negative=True))

    @property
    def session(self) -> ViewerSession:
        """The run shown now."""
        return self.sessions[self.active]

    @property
    def url(self) -> str:
        """Where a browser on this machine opens the viewer."""
        return f"http://{'127.0.0.1' if self.host in ('0.0.0.0', '') else self.host}:{self.port}"

    # ------------------------------------------------------------------------------------------ clients
    def _connect(self, client) -> None:
        state = _Client(client, None)
        state.renderer = ProgressiveRenderer(
            lambda v, side, cancelled: self.session.render(v, side, cancelled, features=self._features_shown(),
                                                           later=side == self.levels[-1]),
            lambda f, level: self._show(state, f, level), self.levels, on_error=self._error,
            finish=lambda f, cancelled: self.session.add_features(f, cancelled))
        with self._lock:
            self.clients[client.client_id] = state
        client.camera.on_update(lambda cam: state.renderer.request(self._view(cam)))
        try:
            state.renderer.request(self._view(client.camera))
        except AssertionError:  # the browser has not reported its camera yet; on_update will
            pass

    def _features_shown(self) -> bool:
        # Frames of modes that do not show features skip the feature branch: moving stays fast, and the full frame
        # is up a quarter sooner; its features follow from the samples it kept (the renderer's `finish`), and a
        # click waits for them.
        return self.mode not in ("rgb", "depth")

    def _disconnect(self, client) -> None:
        with self._lock:
            state = self.clients.pop(client.client_id, None)
        if state is not None:
            state.renderer.stop()

    @staticmethod
    def _view(cam) -> ViewCamera:
        return ViewCamera(tuple(float(v) for v in cam.position), tuple(float(v) for v in cam.wxyz), float(cam.fov),
                          float(cam.aspect))

    def _show(self, state: _Client, frame: Frame, level: int) -> None:
        state.frame = frame
        if level == len(self.levels) - 1:
            state.full = frame
            self._prepare_queries()
        self._draw(state)
        if state.first_frame_s is None:
            state.first_frame_s = time.perf_counter() - state.connected

    def _prepare_queries(self) -> None:
        """Once the first full frame is up, compute in the background what the first click on this run needs (and,
        once, compile the fields' read kernels)."""
        if not self._compile_started:
            self._compile_started = True
            threading.Thread(target=self._compile, name="dfield-compile", daemon=True).start()
        session = self.session
        if session not in self._prepared:
            self._prepared.add(session)
            threading.Thread(target=session.prepare_queries, name="dfield-prepare", daemon=True).start()

    def _compile(self) -> None:
        volumes = [m for s in self.sessions for m in s.run.model.modules() if isinstance(m, VMVolume)]
        failed = compile_kernels(volumes)
        self.kernels = "on" if failed is None else f"eager ({failed})"
        try:
            self._update_panel()
        except Exception:  # noqa: BLE001 (the server may be stopping)
            pass

    @staticmethod
    def _current(state: _Client) -> Frame | None:
        """The best frame of the camera shown now: the full one if it is of this camera, else the coarse one."""
        if state.frame is None:
            return None
        return state.full if state.full is not None and state.full.view == state.frame.view else state.frame

    def _draw(self, state: _Client) -> None:
        frame = self._current(state)
        img = self.session.image(frame, self.mode)
        state.handle.scene.set_background_image(img, format="jpeg", jpeg_quality=92)
        state.last_image = img
        state.shown += 1

    def refresh(self, rerender: bool = False) -> None:
        """Show every client's last frame again in the current mode and query, or render it again (`rerender`:
        the scene changed)."""
        for state in list(self.clients.values()):
            if rerender:
                state.full = None
                state.renderer.request()
            elif state.frame is not None:
                self._draw(state)
        self._update_panel()

    def _error(self, e: BaseException, title: str = "dfield") -> None:
        msg = str(e) if isinstance(e, DfieldError) else f"{type(e).__name__}: {e}"
        self.errors.append(msg)
        if not isinstance(e, DfieldError) and self.verbose:
            traceback.print_exception(e)
        for state in list(self.clients.values()):
            try:
                state.handle.add_notification(title, msg, auto_close_seconds=6.0, color="red")
            except Exception:  # noqa: BLE001 (a closed tab)
                pass

    # ------------------------------------------------------------------------------------------ pointer
    def _client_frame(self, client_id: int, wait_s: float = 30.0) -> Frame | None:
        """The frame a click or box on `client_id` refers to, with features. A click that lands before the
        resting camera's frame has them (coarse frames have none; the full one gets them just after it is shown)
        waits for them: the camera rests, so the renderer is finishing exactly the view the user clicked on."""
        state = self.clients.get(client_id)
        frame = None if state is None else self._current(state)
        if frame is not None and frame.feature is None and self.session.has_features:
            state.renderer.wait_idle(wait_s)
            frame = self._current(state)
            if frame is None or frame.feature is None:
                self._error(DfieldError("the view is still rendering; click again when it is sharp"), "query")
                return None
        return frame

    def _click(self, event, negative: bool) -> None:
        frame = self._client_frame(event.client_id)
        if frame is None or self.click_action == "off" or not self.session.has_features:
            return
        try:
            if self.click_action == "pick cluster":
                self.session.pick_cluster(frame, event.screen_pos, negative)
            else:
                self.session.click(frame, event.screen_pos, negative or self.click_action == "add negative")
        except DfieldError as e:
            self._error(e, "query")
            return
        self._show_query()

    def _box(self, event, negative: bool) -> None:
        frame = self._client_frame(event.client_id)
        if frame is None or not self.session.has_features:
            return
        try:
            self.session.box(frame, event.screen_min, event.screen_max, negative)
        except DfieldError as e:
            self._error(e, "query")
            return
        self._show_query()

    def _show_query(self) -> None:
        if self.mode not in ("relevance", "overlay"):
            self.mode = "overlay"
            self.gui["mode"].value = "overlay"
        self.refresh()

    # ------------------------------------------------------------------------------------------ GUI
    def _build_gui(self) -> None:
        gui = self.server.gui
        g = self.gui = {}
        with gui.add_folder("Scene"):
            if len(self.sessions) > 1:
                g["run"] = gui.add_dropdown("Run", [s.name for s in self.sessions], initial_value=self.session.name,
                                            hint="The camera stays where it is: switch to compare runs")
                g["run"].on_update(lambda _: self._switch(g["run"].value))
            g["mode"] = gui.add_dropdown("Show", MODES, initial_value=self.mode)
            g["mode"].on_update(lambda _: self._set_mode(g["mode"].value))
            g["resolution"] = gui.add_slider("Resolution", 64, 1024, 32, self.levels[-1],
                                             hint="Longest side of the full frame, pixels")
            g["resolution"].on_update(lambda _: self._set_resolution(int(g["resolution"].value)))
            g["info"] = gui.add_markdown("")
            g["save_png"] = gui.add_button("Save view (PNG)")
            g["save_png"].on_click(lambda _: self._save("png"))
        with gui.add_folder("Query"):
            g["click"] = gui.add_dropdown("Click", CLICK_ACTIONS, initial_value=self.click_action,
                                          hint="Shift-click always adds a negative; Ctrl-drag a box adds a positive")
            g["click"].on_update(lambda _: setattr(self, "click_action", g["click"].value))
            g["text"] = gui.add_text("Text", "", hint="Needs a text-aligned teacher (clip)")
            g["add_text"] = gui.add_button("Add text")
            g["add_text"].on_click(lambda _: self._text())
            q = self.session.query
            g["threshold"] = gui.add_slider("Threshold", 0.05, 0.95, 0.05, q.threshold)
            g["temperature"] = gui.add_slider("Temperature", 0.02, 0.5, 0.01, q.temperature)
            g["auto"] = gui.add_checkbox("Automatic negatives", q.auto_negatives)
            g["clusters"] = gui.add_slider("Clusters", 4, 48, 1, q.clusters)
            for key in ("threshold", "temperature", "auto", "clusters"):
                g[key].on_update(lambda _: self._set_query_settings())
            g["clear"] = gui.add_button("Clear query")
            g["clear"].on_click(lambda _: (self.session.clear_query(), self.refresh()))
            g["prompts"] = gui.add_markdown("")
            g["save_ply"] = gui.add_button("Save selection (PLY)")
            g["save_ply"].on_click(lambda _: self._save("ply"))
            g["save_mesh"] = gui.add_button("Save selection mesh")
            g["save_mesh"].on_click(lambda _: self._save("mesh"))
        with gui.add_folder("Edit"):
            g["extract"] = gui.add_button("Extract")
            g["extract"].on_click(lambda _: self._edit("extract"))
            g["delete"] = gui.add_button("Delete")
            g["delete"].on_click(lambda _: self._edit("delete"))
            g["color"] = gui.add_rgb("Colour", (40, 110, 255))
            g["recolor"] = gui.add_button("Recolour")
            g["recolor"].on_click(lambda _: self._edit("recolor", color=[c / 255 for c in g["color"].value]))
            g["translate"] = gui.add_vector3("Move", (0.0, 0.0, 0.0), step=0.05)
            g["rotate"] = gui.add_vector3("Rotate (deg)", (0.0, 0.0, 0.0), step=5.0)
            g["scale"] = gui.add_number("Scale", 1.0, min=0.05, max=20.0, step=0.05)
            g["transform"] = gui.add_button("Transform")
            g["transform"].on_click(lambda _: self._edit("transform", translate=list(g["translate"].value),
                                                         rotate=list(g["rotate"].value), scale=float(g["scale"].value)))
            g["other"] = gui.add_text("Other run", "", hint="A trained run folder to insert (composite)")
            g["composite"] = gui.add_button("Composite")
            g["composite"].on_click(lambda _: self._edit("composite", run=str(Path(g["other"].value).resolve()),
                                                         translate=list(g["translate"].value),
                                                         rotate=list(g["rotate"].value), scale=float(g["scale"].value)))
            g["undo"] = gui.add_button("Undo edit")
            g["undo"].on_click(lambda _: self._undo())
            g["edits"] = gui.add_markdown("")
            g["save_spec"] = gui.add_button("Save edit spec")
            g["save_spec"].on_click(lambda _: self._save("spec"))
        self._update_panel()

    def _update_panel(self) -> None:
        s = self.session
        run = s.run
        lines = [f"**{s.name}** · step {run.step} · {run.cfg.model}"
                 + (f" · teacher {run.cfg.features.teacher}" if s.has_features else " · no features")]
        if self.kernels != "off":
            lines.append(f"compiled kernels: {self.kernels}")
        for state in list(self.clients.values())[:1]:
            f = self._current(state)
            if f is not None:
                lines.append(f"frame {f.size[0]}x{f.size[1]} in {f.seconds:.2f} s")
                if s.query.positives and f.feature is not None:
                    lines.append(f"selected {100 * s.selected_fraction(f):.1f} % of the view")
        self.gui["info"].content = "  \n".join(lines)
        prompts = [("− " if p.negative else "+ ") + p.label for p in s.query.prompts]
        self.gui["prompts"].content = "  \n".join(prompts) if prompts else "*click an object to query it*"
        self.gui["edits"].content = "  \n".join(f"{i + 1}. {e['op']}" for i, e in enumerate(s.edits)) or "*no edits*"

    def _switch(self, name: str) -> None:
        self.active = [s.name for s in self.sessions].index(name)
        self.refresh(rerender=True)

    def _set_mode(self, mode: str) -> None:
        self.mode = mode
        try:
            self.refresh()
        except DfieldError as e:
            self._error(e)

    def _set_resolution(self, side: int) -> None:
        self.levels = tuple(min(v, side) for v in self.levels[:-1]) + (side,)
        for state in self.clients.values():
            state.renderer.levels = self.levels
        self.refresh(rerender=True)

    def _set_query_settings(self) -> None:
        g, q = self.gui, self.session.query
        q.threshold, q.temperature = float(g["threshold"].value), float(g["temperature"].value)
        q.auto_negatives, q.clusters = bool(g["auto"].value), int(g["clusters"].value)
        self.refresh()

    def _text(self) -> None:
        try:
            self.session.text([self.gui["text"].value])
        except DfieldError as e:
            self._error(e, "text query")
            return
        self._show_query()

    def _edit(self, op: str, **params) -> None:
        try:
            self.session.apply_edit(op, **params)
        except DfieldError as e:
            self._error(e, op)
            return
        self.mode = "rgb"
        self.gui["mode"].value = "rgb"
        self.refresh(rerender=True)

    def _undo(self) -> None:
        if self.session.edits:
            self.session.undo_edit()
            self.refresh(rerender=True)

    def _save(self, what: str) -> None:
        s = self.session
        try:
            if what == "png":
                state = next(iter(self.clients.values()), None)
                if state is None or state.frame is None:
                    return
                path = s.save_image(self._current(state), self.mode)
            elif what == "ply":
                path, _ = s.save_selection_ply()
            elif what == "mesh":
                path = s.save_selection_mesh()
            else:
                path = s.save_spec()
        except (DfieldError, ValueError) as e:
            self._error(e, f"save {what}")
            return
        for state in list(self.clients.values()):
            state.handle.add_notification("saved", str(path), auto_close_seconds=5.0)
        if self.verbose:
            print(f"saved {path}", flush=True)

    # ------------------------------------------------------------------------------------------ lifetime
    def wait_frames(self, timeout: float = 30.0, full: bool = True) -> bool:
        """Block until some client has been shown a frame (of the finest level when `full`)."""
        end = time.monotonic() + timeout
        while True:
            for state in list(self.clients.values()):
                if (state.full if full else state.frame) is not None:
                    return True
            if time.monotonic() >= end:
                return False
            time.sleep(0.05)

    def wait(self) -> None:
        """Serve until interrupted (Ctrl-C)."""
        try:
            while True:
                time.sleep(1.0)
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop every render thread and the server."""
        for state in list(self.clients.values()):
            state.renderer.stop()
        self.server.stop()
