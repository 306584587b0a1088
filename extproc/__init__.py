"""extproc: an Envoy external processor that picks the vLLM pod for each OpenAI-style request.

The request's path reads top to bottom in `extproc.pipeline`; the gRPC stream that feeds it is in
`extproc.server.stream`. `docs/architecture.md` draws both.
"""

__version__ = "0.1.0"
