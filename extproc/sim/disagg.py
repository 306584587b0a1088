"""Prefill/decode disaggregation at a simulated server's door, as vLLM with the NixlConnector
and the llm-d routing sidecar do it:
- a body with `kv_transfer_params.do_remote_decode` is a prefill request: its blocks are held
  after it finishes and its JSON answer carries the `kv_transfer_params` that locate them;
- a body with `kv_transfer_params.do_remote_prefill` is a decode request: its engine pulls the
  blocks from the server at `remote_host:remote_port`, found in-process through the injected
  `PeerLookup` (the fleet's), by engine id and `remote_request_id`;
- a request with the `x-prefiller-host-port` header and no `kv_transfer_params` is first sent
  to that server as a prefill request (what the sidecar in front of vLLM does), then served
  by the server that received it, as the decode request.
The engine's side (holding blocks, pulling them) is in `engine`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, Protocol, TypeGuard

import aiohttp

from extproc.sim.engine import Engine
from extproc.sim.request import EngineRequest, FinishedRequest, KVSource

logger = logging.getLogger(__name__)

# The llm-d routing sidecar's header: "prefill this request on host:port first".
PREFILLER_HEADER: Final = "x-prefiller-host-port"
# What the sidecar sends its prefiller (llm-d's nixlv2 connector): "keep the KV for a decode".
_PREFILL_PARAMS: Final[Mapping[str, Any]] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


class Peer(Protocol):
    """Another server of the fleet, as a decode request's pull sees it."""

    @property
    def alive(self) -> bool: ...

    @property
    def engine_id(self) -> str: ...

    @property
    def engine(self) -> Engine: ...


# Finds a server of the same fleet by the host and port it listens on.
PeerLookup = Callable[[str, int], Peer | None]


def no_peers(host: str, port: int) -> Peer | None:
    return None


@dataclass(frozen=True, slots=True)
class KVTransfer:
    """What a request's `kv_transfer_params` ask of the engine."""

    remote_decode: bool = False  # a prefill request: hold the KV for a remote decode
    kv_source: KVSource | None = None  # a decode request: pull the prompt's KV from there
    prefill_seconds: float | None = None  # the simulator's `sim_prefill_seconds`


@dataclass(frozen=True, slots=True)
class _RemoteBlocks:
    """One decode request's view of the blocks a prefill server holds (a `KVSource`).

    vLLM's decode worker handshakes with `remote_host:remote_port` and reads from the engine it
    finds there; here the peer is looked up in the fleet, and must still be up and run the
    engine the parameters name (a restarted server has a new engine id).
    """

    peers: PeerLookup
    host: str | None
    port: int | None
    engine_id: str | None
    request_id: str | None
    block_ids: tuple[int, ...]

    def _engine(self) -> Engine | None:
        if self.host is None or self.port is None:
            return None
        peer = self.peers(self.host, self.port)
        if peer is None or not peer.alive or peer.engine_id != self.engine_id:
            return None
        return peer.engine

    def available(self) -> bool:
        engine = self._engine()
        return engine is not None and engine.find_held(self.request_id, self.block_ids) is not None

    def release(self) -> bool:
        engine = self._engine()
        if engine is None:
            return False
        held = engine.find_held(self.request_id, self.block_ids)
        return held is not None and engine.release_held(held)


def kv_transfer(body: Mapping[str, Any], peers: PeerLookup) -> KVTransfer:
    """Read a request body's `kv_transfer_params`; unusable ones never raise (see below)."""
    params = body.get("kv_transfer_params")
    if not isinstance(params, dict):
        return KVTransfer()
    source: KVSource | None = None
    if params.get("do_remote_prefill") is True:
        # Unusable parameters still make a source: the engine then finds nothing to pull,
        # logs it and prefills locally, as vLLM's "recompute" failure policy does.
        host, port = params.get("remote_host"), params.get("remote_port")
        engine_id, request_id = params.get("remote_engine_id"), params.get("remote_request_id")
        source = _RemoteBlocks(
            peers=peers,
            host=host if isinstance(host, str) else None,
            port=port if isinstance(port, int) and not isinstance(port, bool) else None,
            engine_id=engine_id if isinstance(engine_id, str) else None,
            request_id=request_id if isinstance(request_id, str) else None,
            block_ids=_block_ids(params.get("remote_block_ids")),
        )
    # The prefill's duration, placed back from the arrival here on this server's clock:
    # engines' virtual clocks drift apart under load (a busy one falls behind the wall),
    # durations do not. The hand-off between the two (HTTP, a router) is left out, as a
    # router's own time is left out of every request's TTFT here.
    took = params.get("sim_prefill_seconds")
    return KVTransfer(
        remote_decode=params.get("do_remote_decode") is True,
        kv_source=source,
        prefill_seconds=float(took) if _is_number(took) else None,
    )


def kv_transfer_params(
    req: EngineRequest, record: FinishedRequest, *, engine_id: str, host: str, port: int
) -> dict[str, Any]:
    """vLLM NixlConnector's `request_finished` answer for a prefill request whose blocks are
    held, plus `sim_prefill_seconds` (how long the prefill took, for the decode side's
    record of when the request began). tests/conformance reads this dict's keys from the
    source, by the function's name, and checks them against vLLM's connector."""
    held = list(req.held_block_ids or ())
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        # One list per KV-cache group (vLLM 0.33); a full-attention model has one group.
        "remote_block_ids": [held],
        "remote_engine_id": engine_id,
        "remote_request_id": req.request_id,
        "remote_host": host,
        "remote_port": port,
        "tp_size": 1,
        "dcp_size": 1,
        "pp_size": 1,
        "remote_num_tokens": record.prompt_tokens if held else 0,
        "remote_blocks_expiry_time": None,  # set by vLLM only for blocks pinned on a decode
        "remote_registration_generation": 0,
        "transfer_mode": "pull",
        "sim_prefill_seconds": record.finished - record.first_arrival,
    }


async def prefill_remotely(
    client: Callable[[], aiohttp.ClientSession],
    *,
    headers: Mapping[str, str],
    path: str,
    body: dict[str, Any],
) -> dict[str, Any]:
    """The llm-d routing sidecar in front of this server (its nixlv2 connector): with the
    prefiller header and no `kv_transfer_params`, send the request to the prefiller as a
    one-token, non-streamed prefill request, and return the body to serve here with the
    `kv_transfer_params` it answered. If the prefill fails, the body as it came (served
    here in full). `client` gives the server's session, made on first use."""
    target = headers.get(PREFILLER_HEADER)
    if not target or body.get("kv_transfer_params") is not None:
        return body
    prefill = {k: v for k, v in body.items() if k != "stream_options"}
    prefill["kv_transfer_params"] = dict(_PREFILL_PARAMS)
    prefill["stream"] = False
    prefill["max_tokens"] = 1
    if "max_completion_tokens" in prefill:
        prefill["max_completion_tokens"] = 1
    sent = {"x-request-id": headers.get("x-request-id") or str(uuid.uuid4())}
    url = f"http://{target}{path}"
    try:
        async with client().post(url, json=prefill, headers=sent) as resp:
            status = resp.status
            answer = await resp.json(content_type=None) if status == HTTPStatus.OK else None
    except (aiohttp.ClientError, ValueError, TimeoutError) as exc:
        logger.warning("prefill on %s failed (%r); serving the request in full", target, exc)
        return body
    params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
    if not isinstance(params, dict):
        logger.warning(
            "prefill on %s answered %d without kv_transfer_params; serving the request in full",
            target,
            status,
        )
        return body
    return {**body, "kv_transfer_params": params}


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _block_ids(value: object) -> tuple[int, ...]:
    """`remote_block_ids`: one list per KV-cache group (vLLM 0.33; the first group is the
    full-attention one here) or, as older vLLM sent it, one flat list."""
    if isinstance(value, Sequence) and value and isinstance(value[0], Sequence):
        return _int_tuple(value[0])
    return _int_tuple(value)


def _int_tuple(value: object) -> tuple[int, ...]:
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        return ()
    return tuple(v for v in value if isinstance(v, int) and not isinstance(v, bool))
