"""What the two long-running servers share: the picker (`extproc.server`) and the collector
(`extproc.collector`).

Their listening ports under TLS (`tls`), and the flags that name the pool and the config file
both read (`flags`). It sits below both so that neither imports the other: the collector never
loads the request path, and the picker never loads the collector.
"""
