"""What the benchmark scripts share: a small tokenizer for models fed random ids, and the
resident-memory probe. Imported by the scripts as `common` (their folder is on sys.path)."""

from __future__ import annotations

import os
import threading
import time

__all__ = ["bench_tokenizer", "rss_mib", "PeakRSS"]


def bench_tokenizer():
    """A small byte-level BPE (the benchmarks feed random ids; only the files must exist)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog\n"] * 50, trainer)
    eot = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eot, eos_token=eot, unk_token=eot, pad_token=eot)


def rss_mib() -> float:
    """This process's resident memory, MiB (Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Resident memory while a block runs, sampled every 2 ms by a thread:
    `with PeakRSS() as mem: ...`, then `mem.before` and `mem.peak` (MiB)."""

    def __enter__(self) -> "PeakRSS":
        self.before = self.peak = rss_mib()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, rss_mib())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())
