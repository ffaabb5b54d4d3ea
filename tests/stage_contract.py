"""The stage contract, one base test that every stage's test subclasses (diffusers'
``SchedulerCommonTest`` style): what a step's manifest promises, checked on a real run.

A subclass names its ``step`` and what its manifest must hold (``files``, ``metrics``) and, for a
learned stage, how its model is read back (``load``). The checks run on the shared smoke workflow
(``smoke_on_s3`` in conftest: one `latentflow run` per test session, shared with test_pipeline,
test_ui, ...) and on one rerun of it, so the contract costs the CI run a fully cached rerun, not a
training run per stage (a step the smoke workflow lacks brings its own fixtures: see
TestNoisyClassifier). Resuming after a crash inside a worker is the other contract, on tiny runs
of each learned stage: tests/resume_contract.py.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import pytest

from components.common.step import Manifest


@pytest.mark.integration
class StageContract:
    step: str
    files: frozenset[str] = frozenset()  # relative paths the manifest must list
    metrics: frozenset[str] = frozenset()  # metrics the manifest must carry, finite
    load: Callable[[Manifest], object] | None = None  # the stage's load_<stage>, for a learned stage

    def test_its_manifest_lists_its_files_with_sha256_that_verify(self, smoke_manifests):
        manifest = smoke_manifests[self.step]
        listed = {record.path for record in manifest.files}
        assert self.files <= listed, sorted(self.files - listed)
        assert manifest.verify() == []
        storage = manifest.storage()
        for record in manifest.files:  # the bytes themselves, not a digest recorded beside them
            data = storage.read_bytes(record.path)
            assert (len(data), hashlib.sha256(data).hexdigest()) == (record.size, record.sha256), record.path

    def test_its_manifest_carries_its_metrics(self, smoke_manifests):
        metrics = smoke_manifests[self.step].metrics
        missing = self.metrics - set(metrics)
        assert not missing, sorted(missing)
        assert all(math.isfinite(float(metrics[name])) for name in self.metrics), metrics

    def test_its_model_loads_from_the_manifest(self, smoke_manifests):
        if type(self).load is None:
            pytest.skip(f"{self.step} trains no model")
        assert type(self).load(smoke_manifests[self.step]) is not None

    def test_a_second_run_serves_it_from_cache(self, smoke_manifests, smoke_rerun):
        record = smoke_rerun[self.step]
        assert record["status"] == "cached", record
        assert record["manifest_uri"] == smoke_manifests[self.step].uri("manifest.json")
