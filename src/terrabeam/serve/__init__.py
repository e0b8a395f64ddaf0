"""`terrabeam serve`: a local, read-only web dashboard over a workspace's run history and its maps,
with a JSON API under /api (history.py reads, tiles.py renders map tiles from the COGs, app.py serves)."""
