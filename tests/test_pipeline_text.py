"""The text-conditioned recipe end to end (smoke-text.yaml), as a user runs it: `latentflow retrain`
(captions in the shards -> the joint encoder tau_theta trained with the DiT -> evaluate's prompt
adherence -> the DiT registered as a pyfunc generator that takes prompts), then `latentflow sample
--prompt` on the finished workflow and on the registered model: the same images."""

from __future__ import annotations

import json

import pytest

from components.common.step import read_manifest_at
from components.common.storage import Storage
from components.text.load import TOKENIZER_FILE
from conftest import REPO, latentflow

pytestmark = pytest.mark.integration
SMOKE_TEXT = REPO / "configs" / "pipeline" / "smoke-text.yaml"
PROMPTS = ("--prompt", "a thick seven leaning right", "--prompt", "a thin zero standing upright")


@pytest.fixture(scope="module")
def text_workflow(mlflow_server, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("smoke-text"))
    done = latentflow("retrain", str(SMOKE_TEXT), "--set", f"storage.root={root}", "--set",
                      f"tracking.uri={mlflow_server}", "--workflow-id", "wf-text", timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(Storage.from_uri(root).read_text("workflows/wf-text/summary.json"))
    return root, {record["name"]: read_manifest_at(record["manifest_uri"]) for record in summary["steps"]}


def test_captions_train_a_text_dit_that_evaluate_scores_by_prompt(text_workflow):
    _, steps = text_workflow
    assert set(steps) == {"shard", "autoencoder", "latents", "dit", "distill", "evaluate"}
    dit = steps["dit"]
    assert {TOKENIZER_FILE, "dit.json", "samples.png"} <= {f.path for f in dit.files}
    meta = json.loads(dit.read_verified("dit.json"))
    assert meta["conditioning"] == "text" and meta["text"]["kind"] == "joint" and meta["text_vocabulary"] > 10
    metrics = steps["evaluate"].metrics
    for name in ("sample_accuracy", "prompt_digit_accuracy", "prompt_thickness_agreement", "prompt_slant_agreement",
                 "prompt_thickness_chance", "prompt_slant_chance"):
        assert 0.0 <= float(metrics[name]) <= 1.0, (name, metrics.get(name))
    assert "eval_prompts.png" in {f.path for f in steps["evaluate"].files}
    student = steps["distill"]
    assert student.read_verified(TOKENIZER_FILE) == dit.read_verified(TOKENIZER_FILE)  # the teacher's vocabulary
    round_record = json.loads(student.storage().read_text("round_1/round.json"))  # one progressive round, 4 -> 2
    assert TOKENIZER_FILE in round_record["files"]  # hashed with the round's weights
    assert json.loads(student.read_verified("distill.json"))["text"] == meta["text"]
    for name in ("teacher_4step_sample_accuracy", "student_2step_sample_accuracy"):  # rows drawn from prompts
        assert 0.0 <= float(metrics[name]) <= 1.0, name


def test_prompts_sample_the_workflow_and_its_registered_model_alike(text_workflow, mlflow_server, tmp_path):
    root, _ = text_workflow
    common = (*PROMPTS, "--per-prompt", "2", "--steps", "3", "--seed", "5")
    from_workflow = latentflow("sample", "--workflow-id", "wf-text", "--storage", root, *common,
                               "--out", str(tmp_path / "wf"))
    assert from_workflow.returncode == 0, from_workflow.stderr[-3000:]
    assert "4 images of 2 prompt(s)" in " ".join(from_workflow.stdout.split())
    written = json.loads((tmp_path / "wf" / "prompts.json").read_text())
    assert [p["prompt"] for p in written["prompts"]] == [PROMPTS[1], PROMPTS[3]] and written["per_prompt"] == 2
    registered = latentflow("sample", "--model", "models:/smoke-text-dit@champion", "--tracking-uri", mlflow_server,
                            *common, "--out", str(tmp_path / "model"))
    assert registered.returncode == 0, registered.stderr[-3000:]
    for k in (0, 1):
        for i in (0, 1):
            assert (tmp_path / "model" / str(k) / f"{i}.png").read_bytes() == \
                (tmp_path / "wf" / str(k) / f"{i}.png").read_bytes()
    assert (tmp_path / "wf" / "0" / "0.png").read_bytes() != (tmp_path / "wf" / "1" / "0.png").read_bytes()
    student = ("sample", *PROMPTS, "--per-prompt", "2", "--seed", "5")
    from_student = latentflow(*student, "--workflow-id", "wf-text", "--storage", root, "--step", "distill",
                              "--out", str(tmp_path / "student"))
    assert from_student.returncode == 0, from_student.stderr[-3000:]
    registered_student = latentflow(*student, "--model", "models:/smoke-text-distill@champion", "--tracking-uri",
                                    mlflow_server, "--out", str(tmp_path / "student_model"))
    assert registered_student.returncode == 0, registered_student.stderr[-3000:]
    assert [(tmp_path / "student_model" / k / "1.png").read_bytes() for k in "01"] == \
        [(tmp_path / "student" / k / "1.png").read_bytes() for k in "01"]
    assert (tmp_path / "student" / "0" / "0.png").read_bytes() != (tmp_path / "wf" / "0" / "0.png").read_bytes()
    by_label = latentflow("sample", "--workflow-id", "wf-text", "--storage", root, "--labels", "7", "--per-label", "1",
                          "--out", str(tmp_path / "labels"))
    assert by_label.returncode == 2 and "text-conditioned: give --prompt" in " ".join(by_label.stderr.split())
