"""End to end in a real browser: the viewer on a tiny trained field, opened in headless Chromium (Playwright), shows
a first frame; a click on an object queries it, the picture changes and the selection is not empty. Screenshots
go to the test's temp folder (and to $DFIELD_VIEWER_SCREENSHOTS when set: the README's picture comes from there;
$DFIELD_VIEWER_RUN shows another generated-scene run instead of the tiny one)."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import distance_transform_edt

from dfield.view.browser import browser_page, click_canvas, find_chromium, wait_until

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="no chromium on this machine (scripts/setup.sh "
                                                                "installs Debian's chromium package)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _object_pixel(ids: torch.Tensor) -> tuple[int, float, float]:
    """(object id, x, y) in fractions of the image: the deepest interior pixel of the largest object in view 0."""
    v = ids[0]
    objs, counts = torch.unique(v[v > 1], return_counts=True)  # 0: empty space, 1: the ground
    obj = int(objs[counts.argmax()])
    depth = distance_transform_edt(np.pad((v == obj).numpy(), 1))[1:-1, 1:-1]
    y, x = np.unravel_index(depth.argmax(), depth.shape)
    return obj, (x + 0.5) / v.shape[1], (y + 0.5) / v.shape[0]


def test_viewer_in_a_browser(feature_run, tmp_path, monkeypatch, teacher_cache):
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (scripts/setup.sh installs it)")
    pytest.importorskip("viser", reason="viser is not installed (scripts/setup.sh installs it)")
    from dfield.view.server import Viewer

    monkeypatch.setenv("DFIELD_CACHE_DIR", str(teacher_cache))
    run = Path(os.environ.get("DFIELD_VIEWER_RUN") or feature_run)
    if run == feature_run:
        run = Path(shutil.copytree(feature_run, tmp_path / "run"))
    viewer = Viewer([run], port=_free_port(), levels=(48, 160), verbose=False)
    try:
        assert viewer.host == "127.0.0.1"  # localhost unless told otherwise
        obj, fx, fy = _object_pixel(viewer.session.ctx.data("train").object_ids)
        # A square page: the canvas has training view 0's aspect, so its pixels line up with the view's ids.
        with browser_page(viewer.url, 720, 720) as (page, load_s):
            first = wait_until(lambda: viewer.wait_frames(0.0), 60)
            assert first is not None, f"no frame within 60 s (errors: {viewer.errors})"
            state = next(iter(viewer.clients.values()))
            assert state.full.size == (160, 160)
            # The browser may still send a camera or two while it settles on the initial one: wait until the sharp
            # frame of its last camera is up, and the browser has drawn it.
            page.wait_for_timeout(500)
            assert state.renderer.wait_idle(60) and viewer._current(state) is state.full
            page.wait_for_timeout(500)
            page.screenshot(path=str(tmp_path / "first_frame.png"))
            shown, image_before = state.shown, state.last_image.copy()
            click_canvas(page, fx, fy)
            recolour = wait_until(lambda: state.shown > shown and viewer.session.query.prompts, 20)
            assert recolour is not None, f"the click did not re-colour the view (errors: {viewer.errors})"
            assert state.renderer.wait_idle(60)
            page.wait_for_timeout(500)
            page.screenshot(path=str(tmp_path / "after_click.png"))
        assert viewer.mode == "overlay" and viewer.errors == []
        frame = state.full
        assert viewer.session.selected_fraction(frame) > 0  # the selection is not empty
        assert (state.last_image != image_before).any()  # the rendered image changed
        # ... and so does what the browser shows, in the canvas left of the panel.
        a, b = (np.asarray(Image.open(tmp_path / n).convert("RGB"), dtype=np.int16)[:, :400]
                for n in ("first_frame.png", "after_click.png"))
        assert (np.abs(a - b).max(-1) > 40).sum() > 50
        prob = viewer.session.probability(frame)
        x, y = frame.pixel((fx, fy))
        assert prob[y, x] > viewer.session.query.threshold  # the clicked object is selected where it was clicked
        figures = {"page_load_s": load_s, "first_frame_s": first, "click_recolour_s": recolour,
                   "frame_seconds": {str(k): v for k, v in state.renderer.last_seconds.items()}}
        (tmp_path / "viewer_timings.json").write_text(json.dumps(figures, indent=1))
        print(figures)
        out = os.environ.get("DFIELD_VIEWER_SCREENSHOTS")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            for n in ("first_frame.png", "after_click.png"):
                shutil.copy(tmp_path / n, Path(out) / f"viewer_{n}")
    finally:
        viewer.stop()
