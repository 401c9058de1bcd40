"""App: the only layer that prints or composes commands. `api` (the Python functions behind every command), `cli`
(the `dfield` command on tyro), `demo`, and `progress` (rich bars for the library's progress callbacks).

May import every layer; nothing imports it.
"""
