"""The interactive viewer: a browser camera drives the renderer; clicks, boxes and texts query the field; the
edit panel applies the same edit specs as `dfield edit`.

May import every layer below it (it renders through core, queries through query/, edits through edit/); only app/
imports it. Only `server` touches viser and only `browser` Playwright; `camera`, `frames`, `progressive` and
`session` are plain Python, tested without a browser.
"""
