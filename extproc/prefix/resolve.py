"""Where a model's own tokenizer files are: the default tokenizer of `prefix.default_tokenizer:
auto`, shared by the picker and the simulator so both resolve a model the same way.

A served model name is looked up, in order:

1. each configured models directory: `DIR/<org>/<name>/tokenizer.json` (the model name as a
   path), `DIR/<name>/tokenizer.json`, then DIR as a Hugging Face cache (layout below);
2. the Hugging Face cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`,
   laid out as `models--<org>--<name>/snapshots/<revision>/tokenizer.json` (the revision
   `refs/main` names, else the newest snapshot holding a tokenizer.json);
3. the Hugging Face hub (`fetch_from_hub`, async): `HF_ENDPOINT` (default huggingface.co),
   `HF_TOKEN` for gated models, one attempt per file with a short timeout and no retries, so an
   unreachable hub costs seconds once, not the minutes `huggingface_hub`'s retries take. The
   files land in the cache layout above, so the next start finds them in step 2.
   `HF_HUB_OFFLINE=1` skips it.

The directory found holds `tokenizer.json` and, when the model has one, `tokenizer_config.json`
(its chat template) or `chat_template.jinja`: `extproc.prefix.tokenizers` loads both.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import aiohttp

log = logging.getLogger(__name__)

TOKENIZER_FILE: Final = "tokenizer.json"
# Fetched from the hub beside tokenizer.json; only tokenizer.json is required.
HUB_FILES: Final = (TOKENIZER_FILE, "tokenizer_config.json", "chat_template.jinja")
DEFAULT_HUB: Final = "https://huggingface.co"
DEFAULT_HUB_TIMEOUT_SECONDS: Final = 5.0


def hub_cache_dir(environ: Mapping[str, str]) -> Path:
    """The Hugging Face hub cache directory `huggingface_hub` would use in this environment."""
    if environ.get("HF_HUB_CACHE"):
        return Path(environ["HF_HUB_CACHE"])
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]) / "hub"
    cache = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME", "~")) / ".cache")
    return Path(cache).expanduser() / "huggingface" / "hub"


def _cached_snapshot(cache: Path, model: str) -> Path | None:
    repo = cache / ("models--" + model.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        pinned = snapshots / ref.read_text(encoding="utf-8").strip()
        if (pinned / TOKENIZER_FILE).is_file():
            return pinned
    found = [s for s in snapshots.iterdir() if (s / TOKENIZER_FILE).is_file()]
    return max(found, key=lambda s: s.stat().st_mtime) if found else None


def find_local(
    model: str, *, models_dirs: Sequence[str | Path] = (), environ: Mapping[str, str]
) -> Path | None:
    """The directory holding `model`'s tokenizer.json on this machine, or None. Pure file-system
    reads: call it off the event loop."""
    if not model or ".." in Path(model).parts or Path(model).is_absolute():
        return None  # a request's model name never leaves the directories it is looked up in
    for base in (Path(d) for d in models_dirs if d):
        for candidate in (base / model, base / Path(model).name):
            if (candidate / TOKENIZER_FILE).is_file():
                return candidate
        snapshot = _cached_snapshot(base, model)
        if snapshot is not None:
            return snapshot
    return _cached_snapshot(hub_cache_dir(environ), model)


async def fetch_from_hub(
    model: str,
    *,
    environ: Mapping[str, str],
    timeout_seconds: float = DEFAULT_HUB_TIMEOUT_SECONDS,
) -> Path | None:
    """Download `model`'s tokenizer files into the hub cache; the snapshot directory, or None
    when the hub is off, unreachable, or has no tokenizer.json for it (logged, never raised)."""
    if environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or "/" not in model:
        return None
    base = (environ.get("HF_ENDPOINT") or DEFAULT_HUB).rstrip("/")
    headers = {"Authorization": f"Bearer {environ['HF_TOKEN']}"} if environ.get("HF_TOKEN") else {}
    timeout = aiohttp.ClientTimeout(total=timeout_seconds)
    fetched: dict[str, bytes] = {}
    revision = "main"
    try:
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
            for name in HUB_FILES:
                async with session.get(f"{base}/{model}/resolve/main/{name}") as resp:
                    if resp.status != 200:
                        if name == TOKENIZER_FILE:
                            log.info("no tokenizer for %s on the hub (HTTP %d)", model, resp.status)
                            return None
                        continue
                    revision = resp.headers.get("X-Repo-Commit", revision)
                    fetched[name] = await resp.read()
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        log.info("the Hugging Face hub is not reachable for %s: %s", model, exc or type(exc))
        return None
    cache = hub_cache_dir(environ)
    repo = cache / ("models--" + model.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    try:
        snapshot.mkdir(parents=True, exist_ok=True)
        for name, data in fetched.items():
            (snapshot / name).write_bytes(data)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(revision, encoding="utf-8")
    except OSError as exc:
        log.warning("cannot write %s's tokenizer into %s: %s", model, cache, exc)
        return None
    return snapshot


def environment() -> Mapping[str, str]:
    """The process environment, read once where the caller is built (I/O at the edge)."""
    return dict(os.environ)
