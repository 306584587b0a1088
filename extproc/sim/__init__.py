"""A simulated vLLM fleet: N servers in one asyncio process, each with vLLM's HTTP surface, a
discrete-step engine (continuous batching, chunked prefill, a block-level prefix cache with
vLLM's exact hashes, preemption, LoRA, prefill/decode disaggregation as vLLM's NixlConnector and
the llm-d routing sidecar do it), vLLM's metrics and KV-cache events over ZMQ. Servers may run
different GPU profiles (a mixed fleet) and count their busy time.

Modules, bottom up: `profiles` (step-time tables), `cache` (the KV block pool), `request` (a
request's bookkeeping and finished record), `transfer` (held blocks and KV pulls), `scheduler`
(each step's plan), `engine` (the step loop), `metrics`, `events` (ZMQ publisher and replay),
`faults`, `api` (vLLM's request checks and answers), `disagg` (`kv_transfer_params` and the
llm-d sidecar), `server` (HTTP), `fleet` (many servers and the library entry point), `cli`
(`extproc sim`). This package imports only
`extproc.prefix` from the rest of extproc, so the picker's hashes and ours agree by construction.
"""

from extproc.sim.fleet import ServerHandle, SimConfig, SimFleet

__all__ = ["ServerHandle", "SimConfig", "SimFleet"]
