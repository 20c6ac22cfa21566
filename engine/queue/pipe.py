"""A pool worker's queue backend when the coordinator alone holds the database (DuckDB).

Requests go to the coordinator on one shared multiprocessing queue; answers come back on the
worker's own queue. Results, completions, releases and failures are one-way messages: the
coordinator buffers them and writes them in bulk, in arrival order, so a completion is never
stored before the results that precede it. A worker killed mid-way loses at most what was
still in its pipe; its tasks were not completed, so they run again and nothing is lost.
"""

from __future__ import annotations

import itertools
import queue
import threading
from typing import Any

from engine.model import ItemResult, ResultBatch
from engine.queue.base import Reply

ONE_WAY = {"submit", "complete", "release", "fail", "unregister"}


class PipeQueue:
    def __init__(self, requests: Any, replies: Any, timeout_s: float = 60.0) -> None:
        self.requests = requests
        self.replies = replies
        self.timeout_s = timeout_s
        self._ids = itertools.count()
        self._lock = threading.Lock()  # one round trip at a time per worker

    def _call(self, worker_id: str, op: str, *args: Any) -> Any:
        req_id = next(self._ids)
        if op in ONE_WAY:
            self.requests.put((worker_id, req_id, op, args))
            return None
        with self._lock:
            self.requests.put((worker_id, req_id, op, args))
            while True:
                try:
                    got_id, result = self.replies.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise TimeoutError(
                        f"no answer from the coordinator to {op} in {self.timeout_s:.0f}s"
                    ) from None
                if got_id == req_id:
                    return result

    def register(self, worker_id: str, host: str, pid: int, kind: str) -> None:
        self._call(worker_id, "register", host, pid, kind)

    def claim(self, worker_id: str, max_tasks: int, run_id: int | None = None) -> Reply:
        return self._call(worker_id, "claim", max_tasks, run_id)

    def heartbeat(
        self, worker_id: str, task_ids: list[int], status: str, done: int, failed: int
    ) -> Reply:
        return self._call(worker_id, "heartbeat", task_ids, status, done, failed)

    def submit(self, worker_id: str, results: list[ItemResult | ResultBatch]) -> None:
        self._call(worker_id, "submit", results)

    def complete(self, worker_id: str, task_ids: list[int]) -> None:
        self._call(worker_id, "complete", task_ids)

    def release(self, worker_id: str, task_ids: list[int]) -> None:
        self._call(worker_id, "release", task_ids)

    def fail(self, worker_id: str, task_ids: list[int], error: str) -> None:
        self._call(worker_id, "fail", task_ids, error)

    def unregister(self, worker_id: str, reason: str) -> None:
        self._call(worker_id, "unregister", reason)
