"""Background worker processes, one per slot of a rank, each building its slot's batches ahead.

A worker sends every batch together with its slot's state *after* that batch. The loader hands the
batches out round-robin and keeps, per slot, the state that came with the last batch it handed out, so
its state never includes a prefetched batch the trainer has not seen: resuming from it rebuilds the
prefetched batches exactly.

Workers come from a fork server: a clean process, started once, that has imported this module and
forks a worker per slot. Forking the trainer itself could copy CUDA, NCCL or tokenizer thread pools
in an undefined state; spawning would pay for the imports (torch included) in every worker.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import traceback
from typing import Optional

from .slot import Slot, SlotSpec
from .sources import DataExhausted

POLL_S = 1.0  # how often a waiting loader checks that the worker is still alive


def _run(spec: SlotSpec, slot: int, num_slots: int, state: Optional[dict], out: mp.Queue) -> None:
    try:
        pipeline = Slot(spec, slot, num_slots)
        if state is not None:
            pipeline.load_state_dict(state)
        while True:
            batch, started = pipeline.next_batch()
            out.put(("batch", batch, started, pipeline.state_dict()))
    except BaseException as err:  # noqa: BLE001 - everything goes back to the trainer
        out.put(("error", type(err).__name__, str(err), traceback.format_exc()))


class WorkerPool:
    def __init__(self, spec: SlotSpec, slots: list[int], num_slots: int, states: list[Optional[dict]],
                 prefetch: int):
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])  # takes effect when the server starts, once per process
        self._queues = [ctx.Queue(maxsize=prefetch) for _ in slots]
        self._procs = [
            ctx.Process(target=_run, args=(spec, slot, num_slots, state, q), daemon=True,
                        name=f"data-slot-{slot}")
            for slot, state, q in zip(slots, states, self._queues)
        ]
        for proc in self._procs:
            proc.start()

    def get(self, j: int) -> tuple[dict, list, dict]:
        """(batch arrays, started documents, slot state after the batch) of worker j's next batch."""
        while True:
            try:
                message = self._queues[j].get(timeout=POLL_S)
                break
            except queue.Empty:
                if not self._procs[j].is_alive():
                    raise RuntimeError(f"data worker {self._procs[j].name} exited with code "
                                       f"{self._procs[j].exitcode} without a message") from None
        if message[0] == "batch":
            return message[1], message[2], message[3]
        _, kind, text, trace = message
        if kind == "DataExhausted":
            raise DataExhausted(text)
        if kind == "ValueError":
            raise ValueError(text)
        raise RuntimeError(f"data worker {self._procs[j].name} failed: {kind}: {text}\n{trace}")

    def close(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(timeout=10)
        for q in self._queues:
            q.cancel_join_thread()  # unread batches must not block interpreter exit
            q.close()
        self._procs, self._queues = [], []
