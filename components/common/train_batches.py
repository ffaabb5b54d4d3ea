"""The batches a training worker consumes: where they come from (the task's stream, or its plain
``batches()`` replayed), the data position they keep current in the train state, so a resumed
run continues where it stopped, and ``train.audit_data``'s record of what was consumed."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING

from components.common.checkpoint import TrainState
from components.common.stream import StreamedBatch
from components.common.train_types import TrainConfig, TrainTask

if TYPE_CHECKING:
    from components.common.stream import BatchSource


def batch_source(task: TrainTask, cfg: TrainConfig, session) -> "BatchSource":
    if callable(getattr(task, "batch_source", None)):
        return task.batch_source(session.rank, session.world_size, cfg.micro_batch_size(session.world_size))
    return ReplaySource(task, session.rank, session.world_size)


class ReplaySource:
    """A task's plain ``batches(epoch, rank, world_size)`` as a BatchSource: the position is the
    batch count, and resuming re-iterates the epoch up to it (fine for small synthetic data only)."""

    def __init__(self, task: TrainTask, rank: int, world_size: int):
        self.task, self.rank, self.world_size = task, rank, world_size

    def batches_per_epoch(self, epoch: int) -> int | None:
        return None  # as many as batches() yields

    def epoch(self, epoch: int, position: int, batches_done: int) -> Iterator[StreamedBatch]:
        batches = self.task.batches(epoch, self.rank, self.world_size)
        for index, batch in enumerate(itertools.islice(batches, batches_done, None), start=batches_done):
            yield StreamedBatch(batch, epoch, index + 1)

    def close(self) -> None:
        pass


def batch_stream(source: "BatchSource", state: TrainState, audit: "DataAudit | None") -> Iterator[dict]:
    """Batches forever, epoch after epoch, keeping the data position in ``state`` current."""
    while True:
        produced = False
        for item in source.epoch(state.epoch, state.data_position, state.batches_in_epoch):
            produced = True
            state.data_position, state.batches_in_epoch = item.position, state.batches_in_epoch + 1
            state.bad_samples += item.skipped
            if audit is not None:
                audit.record(item)
            yield item.tensors
        if not produced and state.batches_in_epoch == 0:
            raise ValueError(f"epoch {state.epoch} gave this worker no batches: the dataset has fewer "
                             "rows than num_workers x the micro-batch")
        state.epoch, state.data_position, state.batches_in_epoch = state.epoch + 1, 0, 0


class DataAudit:
    """``train.audit_data``: the keys of every consumed batch, written at each checkpoint to
    ``<audit_uri>/rank-<r>/upto-step-<step>.json``. A crash loses only what no checkpoint covers,
    and the resumed run writes those files again, so the files are exactly what the final weights saw."""

    def __init__(self, uri: str, rank: int, node_id: str, step: int):
        self.uri, self.rank, self.node_id, self.from_step = uri, rank, node_id, step
        self.batches: list[dict] = []

    def record(self, item: StreamedBatch) -> None:
        self.batches.append({"epoch": item.epoch, "position": item.position, "keys": item.keys})

    def commit(self, step: int) -> None:
        import json

        from components.common.storage import Storage

        record = {"rank": self.rank, "node_id": self.node_id, "from_step": self.from_step, "to_step": step,
                  "batches": self.batches}
        Storage.from_uri(self.uri).write_text(f"rank-{self.rank}/upto-step-{step:09d}.json", json.dumps(record))
        self.batches, self.from_step = [], step
