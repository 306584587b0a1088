"""`extproc collector`: the state side of many picker replicas, run once and streamed to them.

It imports the state side (`extproc.state`) and what both servers share (`extproc.serving`),
never the request path: pyproject.toml's import-linter contracts hold it to that.
"""
