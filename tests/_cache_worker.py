"""Subprocess for the kill-and-resume test: caches a model over a saved token set, printing
`rows <n>` after each flushed batch and pausing briefly so the parent can kill it part-way."""

import sys
import time

from universal_neurons.activations import load_model, store
from universal_neurons.activations.store import StoreConfig, cache_activations
from universal_neurons.activations.tokens import load_token_set

if __name__ == "__main__":
    model_dir, token_path, out, dtype = sys.argv[1:5]

    def after(rows: int) -> None:
        print(f"rows {rows}", flush=True)
        time.sleep(0.05)

    store.after_batch = after
    lm = load_model(model_dir, checkpoint=0)
    cache_activations(lm, load_token_set(token_path), out, config=StoreConfig(dtype=dtype, kinds=("post", "pre")),
                      batch_rows=4)
    print("done", flush=True)
