"""The gRPC edge: the ext_proc stream, the replies Envoy understands, health, and the app."""
