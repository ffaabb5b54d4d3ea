"""Every stage of the smoke workflow against the stage contract (tests/stage_contract.py)."""

from __future__ import annotations

import json

import pytest

from components.autoencoder.load import AE_META, AE_WEIGHTS, load_autoencoder
from components.common.step import read_manifest_at
from components.common.storage import Storage
from components.controlnet.load import CONTROLNET_META, CONTROLNET_WEIGHTS, load_controlnet
from components.controlnet.train import GRID as CONTROLNET_GRID
from components.distill.load import STUDENT_META, STUDENT_WEIGHTS, load_student
from components.dit.load import DIT_META, DIT_RAW_WEIGHTS, DIT_WEIGHTS, load_dit
from components.evaluate.load import CLASSIFIER_META, CLASSIFIER_WEIGHTS, load_classifier
from components.inception_reference.load import SUMMARY, reference_file
from components.noisy_classifier.load import META as NC_META, WEIGHTS as NC_WEIGHTS, load_noisy_classifier
from components.noisy_classifier.train import CHART as NC_CHART
from components.superres.load import SR_META, SR_RAW_WEIGHTS, SR_WEIGHTS, load_superres
from conftest import REPO, latentflow
from stage_contract import StageContract

SMOKE = REPO / "configs" / "pipeline" / "smoke.yaml"


def workflow_steps(root: str, workflow_id: str) -> dict[str, dict]:
    summary = json.loads(Storage.from_uri(root).read_text(f"workflows/{workflow_id}/summary.json"))
    return {record["name"]: record for record in summary["steps"]}


@pytest.fixture(scope="module")
def smoke_manifests(smoke_on_s3):
    root, _, first = smoke_on_s3
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return {name: read_manifest_at(record["manifest_uri"]) for name, record in workflow_steps(root, "wf-one").items()}


@pytest.fixture(scope="module")
def smoke_rerun(smoke_on_s3, mlflow_server):
    """The smoke workflow run again under a new workflow id: every step's record of that run."""
    root, env, _ = smoke_on_s3
    again = latentflow("run", str(SMOKE), "--set", f"storage.root={root}", "--set", f"tracking.uri={mlflow_server}",
                       "--workflow-id", "wf-contract", env=env, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    return workflow_steps(root, "wf-contract")


# smoke.yaml has no noisy classifier and no ControlNet (with them, evaluate would score classifier
# guidance and control fidelity, and its cache key would change): the smoke workflow with both,
# --only them, on the smoke's storage, so their upstream steps are served from the smoke run's cache.
NOISY_CLASSIFIER = ("noisy_classifier.preset=nc-tiny", "noisy_classifier.resources.num_cpus=0",
                    "noisy_classifier.resources.num_workers=2", "noisy_classifier.resources.cpus_per_worker=0.5",
                    "noisy_classifier.train.max_steps=8", "noisy_classifier.train.batch_size=32",
                    "noisy_classifier.train.checkpoint_every=4", "noisy_classifier.train.ema_decay=0.8",
                    "noisy_classifier.t_buckets=2")
CONTROLNET = ("controlnet.num_blocks=1", "controlnet.resources.num_cpus=0", "controlnet.resources.num_workers=2",
              "controlnet.resources.cpus_per_worker=0.5", "controlnet.train.max_steps=8",
              "controlnet.train.batch_size=32", "controlnet.train.checkpoint_every=4", "controlnet.train.ema_decay=0.8",
              "controlnet.grid_controls=2", "controlnet.grid_per_control=1", "controlnet.sample.steps=2")


@pytest.fixture(scope="module")
def extra_runs(smoke_on_s3, mlflow_server) -> tuple[dict, dict]:
    """(manifests, records of a second run) of the smoke workflow with a noisy classifier and a ControlNet."""
    root, env, first = smoke_on_s3
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    sets = [arg for value in (f"storage.root={root}", f"tracking.uri={mlflow_server}", *NOISY_CLASSIFIER, *CONTROLNET)
            for arg in ("--set", value)]
    for workflow_id in ("wf-extra", "wf-extra-again"):
        done = latentflow("run", str(SMOKE), *sets, "--only", "noisy_classifier,controlnet", "--workflow-id",
                          workflow_id, env=env, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifests = {name: read_manifest_at(record["manifest_uri"])
                 for name, record in workflow_steps(root, "wf-extra").items()}
    return manifests, workflow_steps(root, "wf-extra-again")


class TestShard(StageContract):
    step = "shard"
    metrics = frozenset({"num_train", "num_val"})


class TestAutoencoder(StageContract):
    step = "autoencoder"
    files = frozenset({AE_WEIGHTS, AE_META, "reconstructions.png"})
    metrics = frozenset({"scale_factor", "steps"})
    load = staticmethod(load_autoencoder)


class TestLatents(StageContract):
    step = "latents"
    metrics = frozenset({"num_train", "num_val"})


class TestDit(StageContract):
    step = "dit"
    files = frozenset({DIT_WEIGHTS, DIT_RAW_WEIGHTS, DIT_META, "samples.png"})
    metrics = frozenset({"loss", "mse", "steps", "model_flops_per_image"})
    load = staticmethod(load_dit)


class TestDistill(StageContract):
    step = "distill"
    files = frozenset({STUDENT_WEIGHTS, STUDENT_META, "samples.png"})
    metrics = frozenset({"native_steps"})
    load = staticmethod(load_student)


class TestSuperres(StageContract):
    step = "superres_1"
    files = frozenset({SR_WEIGHTS, SR_RAW_WEIGHTS, SR_META})
    metrics = frozenset({"psnr", "steps"})
    load = staticmethod(load_superres)


class TestInceptionReference(StageContract):
    step = "inception_reference"
    files = frozenset({reference_file("base"), reference_file("cascade"), SUMMARY})
    metrics = frozenset({"fid_real_baseline", "cascade_fid_real_baseline"})


class TestEvaluate(StageContract):
    step = "evaluate"
    files = frozenset({CLASSIFIER_WEIGHTS, CLASSIFIER_META, "eval_samples.png", "evaluation.json"})
    metrics = frozenset({"sample_accuracy", "frechet_distance", "classifier_val_accuracy"})
    load = staticmethod(load_classifier)


class TestNoisyClassifier(StageContract):
    step = "noisy_classifier"
    files = frozenset({NC_WEIGHTS, NC_META, NC_CHART})
    metrics = frozenset({"loss", "steps", "val_samples", "val_accuracy_t0_499"})
    load = staticmethod(load_noisy_classifier)

    @pytest.fixture
    def smoke_manifests(self, extra_runs):
        return extra_runs[0]

    @pytest.fixture
    def smoke_rerun(self, extra_runs):
        return extra_runs[1]


class TestControlNet(TestNoisyClassifier):
    step = "controlnet"
    files = frozenset({CONTROLNET_WEIGHTS, CONTROLNET_META, CONTROLNET_GRID})
    metrics = frozenset({"loss", "mse", "steps", "trainable_parameters"})
    load = None

    def test_its_model_loads_from_the_manifest(self, smoke_manifests):  # over the DiT it was trained on
        assert load_controlnet(smoke_manifests["controlnet"], smoke_manifests["dit"]) is not None

    def test_it_trained_only_its_branch_and_logged_its_grid_series(self, smoke_manifests, mlflow_server, tmp_path):
        """What the step on 2 Ray Train workers did: the branch (not the DiT) trained off zero, the grid
        logged as an image series at its checkpoints and at the end, another DiT refused."""
        from mlflow.tracking import MlflowClient

        from test_control_fidelity import dit_manifest

        manifest = smoke_manifests["controlnet"]
        assert 0 < manifest.info["parameters"] < manifest.info["dit_parameters"]
        model, meta, _ = load_controlnet(manifest, smoke_manifests["dit"])
        assert meta["control"] == "edges" and meta["num_blocks"] == 1 and len(model.controlnet.blocks) == 1
        assert any(v.abs().sum() > 0 for k, v in model.state_dict().items() if "zero_linears" in k)
        with pytest.raises(ValueError, match="trained on the DiT weights with sha256"):
            load_controlnet(manifest, dit_manifest(tmp_path, list(smoke_manifests["shard"].info["classes"]), seed=1))
        client = MlflowClient(mlflow_server)
        series = [a.path for a in client.list_artifacts(manifest.mlflow_run_id, "images")]
        assert any("samples+step+4+" in p for p in series) and any("samples+step+8+" in p for p in series), series
        assert {CONTROLNET_GRID, CONTROLNET_META} <= {a.path for a in client.list_artifacts(manifest.mlflow_run_id)}
