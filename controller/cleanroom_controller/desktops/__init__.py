"""Non-persistent desktops: the pools they belong to (``config``), the state each one is in (``machine``,
pure), the runner that logs sessions off and wipes desktops through their drivers (``runner``), and the
operator's actions on them (``operations``). See docs/desktops.md.

Nothing is imported here: the drivers import the config models, and the runner imports the drivers."""
