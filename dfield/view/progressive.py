"""Progressive rendering for one browser client: while the camera moves only coarse frames are drawn; once it
rests the same view is refined level by level (nerfstudio's render state machine, reduced to a list of sizes).
A frame in progress is abandoned between chunks of rays as soon as a newer camera arrives."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from dfield.view.camera import ViewCamera
from dfield.view.frames import Cancelled, Frame


class ProgressiveRenderer:
    """Render the latest requested camera in a worker thread at each of `levels` (longest side in pixels, coarse
    to fine) and hand every finished frame to `show(frame, level)`.

    The worker thread ends once it has been idle for `idle_exit` seconds and a new request starts another. A thread
    that has rendered keeps an OpenMP team of its own, and while a process holds two teams (the trainer's and this
    one's during `dfield train --view`) libgomp stops letting either spin between parallel regions: measured on 2
    cores, renders 1.64-1.78 s instead of 1.16-1.33 s and the other thread's work as much slower, for as long as the
    idle team exists.

    `render(view, side, cancelled)` makes a Frame and should raise Cancelled when `cancelled()` turns true;
    `finish(frame, cancelled)`, when given, completes the finest frame after it is shown (the viewer adds its
    features there) and its result is shown again; `on_error(exception)` hears about anything else a render
    raises (the loop keeps running). A request counts as done (`wait_idle`) once finished.

    Example:
        >>> shown = []
        >>> r = ProgressiveRenderer(lambda v, side, c: side, lambda f, lvl: shown.append(f), levels=(8, 32))
        >>> r.request(ViewCamera((0, 0, 0), (1, 0, 0, 0), 1.0, 1.0)); r.wait_idle(5.0); r.stop()
        True
        >>> shown
        [8, 32]
    """

    def __init__(self, render: Callable[[ViewCamera, int, Callable[[], bool]], Frame],
                 show: Callable[[Frame, int], None], levels: tuple[int, ...] = (64, 256),
                 on_error: Callable[[BaseException], None] | None = None,
                 finish: Callable[[Frame, Callable[[], bool]], Frame] | None = None, idle_exit: float = 1.0):
        self.render, self.show, self.levels, self.finish = render, show, tuple(levels), finish
        self.idle_exit = idle_exit
        self.on_error = on_error or (lambda e: None)
        self._cond = threading.Condition()
        self._view: ViewCamera | None = None
        self._gen = 0  # bumped by every request; a render of an older generation is stale
        self._done = -1  # the last generation rendered to the finest level (or abandoned)
        self._stopped = False
        self.frames = 0
        self.last_seconds: dict[int | str, float] = {}  # per level, and "finish"
        self._thread: threading.Thread | None = None
        self.threads_started = 0

    def request(self, view: ViewCamera | None = None) -> None:
        """Render `view` (None: the last one again, e.g. after an edit changed the scene)."""
        with self._cond:
            if view is not None:
                self._view = view
            self._gen += 1
            self._cond.notify_all()
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._loop, name="dfield-render", daemon=True)
                self.threads_started += 1
                self._thread.start()

    def stop(self) -> None:
        """End the worker thread (after the chunk it is on)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=10)

    def wait_idle(self, timeout: float) -> bool:
        """Block until the latest request is rendered at every level (True), or `timeout` seconds pass (False)."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._done != self._gen or self._view is None:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _stale(self, gen: int) -> bool:
        return self._stopped or self._gen != gen

    def _finish(self, frame: Frame, level: int, gen: int) -> None:
        t0 = time.perf_counter()
        try:
            done = self.finish(frame, lambda: self._stale(gen))
        except Cancelled:
            return
        except Exception as e:  # noqa: BLE001
            self.on_error(e)
            return
        if done is frame or self._stale(gen):
            return
        self.last_seconds["finish"] = time.perf_counter() - t0
        try:
            self.show(done, level)
        except Exception as e:  # noqa: BLE001
            self.on_error(e)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (self._view is None or self._done == self._gen):
                    if not self._cond.wait(self.idle_exit) and (self._view is None or self._done == self._gen):
                        self._thread = None  # idle: end, and with this thread its OpenMP team
                        return
                if self._stopped:
                    self._thread = None
                    return
                gen, view = self._gen, self._view
            for level, side in enumerate(self.levels):
                t0 = time.perf_counter()
                try:
                    frame = self.render(view, side, lambda: self._stale(gen))
                except Cancelled:
                    break
                except Exception as e:  # noqa: BLE001 (a failed frame must not kill the viewer)
                    self.on_error(e)
                    break
                if self._stale(gen):
                    break
                self.last_seconds[level] = time.perf_counter() - t0
                self.frames += 1
                try:
                    self.show(frame, level)
                except Exception as e:  # noqa: BLE001
                    self.on_error(e)
                if self.finish is not None and level == len(self.levels) - 1:
                    self._finish(frame, level, gen)
            with self._cond:
                if self._gen == gen:
                    self._done = gen
                self._cond.notify_all()
