"""Token blocks and their hashes: the shared ground between the picker and the simulator.

`tokenizers` turns text and chat messages into token ids; `hashing` turns token ids into vLLM's
chained prefix-cache block hashes. The picker uses both to know which blocks a request shares with
what a pod holds; `extproc.sim` uses the same code for its cache, so the two agree by construction.
Both modules are pure: no I/O beyond loading a tokenizer file, no module-level mutable state.
"""
