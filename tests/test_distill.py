"""The distill step: the progressive target against a brute-force teacher, the consistency
boundary, students moving toward their targets, resume with the target network, sampling with
each method, and the step on Ray Train interrupted inside a round and resumed.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from safetensors.torch import save_file

from components.common.train_loop import LocalSession, train_loop
from components.diffusion import NoiseSchedule, ddim_step, make_cfg_model_fn, spaced_timesteps
from components.distill.config import DistillConfig
from components.distill.consistency import ConsistencyFunction, consistency_levels, ct_num_levels
from components.distill.sample import generate_student, supported_steps
from components.distill.task import ConsistencyTask, ProgressiveTask
from components.dit.model import DIT_PRESETS, DiT
from tests.test_dit import CLASSES, LATENT, synthetic_latents, tiny_autoencoder
from components.dit.load import DitMeta
from crash_hooks import crashing
import metas
from rounding import assert_same_up_to_rounding

GUIDANCE = 1.5


pytestmark = pytest.mark.usefixtures("one_thread")


def perturbed_dit(num_classes: int) -> tuple[dict, torch.nn.Module]:
    """(arguments, DiT) as the DiT step builds it, weights perturbed so labels and guidance matter
    (adaLN-Zero starts at a zero output)."""
    torch.manual_seed(0)
    kwargs = {**DIT_PRESETS["DiT-Micro/2"], "input_size": LATENT[1], "in_channels": LATENT[0],
              "num_classes": num_classes, "learn_sigma": False, "class_dropout_prob": 0.1}
    dit = DiT(**kwargs)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return kwargs, dit


def teacher_dir(tmp_path, prediction="v") -> tuple[str, DitMeta]:
    """A v-prediction DiT saved as the DiT step saves it, perturbed so labels and guidance matter."""
    kwargs, dit = perturbed_dit(len(CLASSES))
    out = tmp_path / "dit"
    out.mkdir(exist_ok=True)
    save_file(dit.state_dict(), str(out / "dit.safetensors"))
    meta = metas.dit_meta(model=kwargs, schedule="scaled_linear", num_timesteps=1000, prediction=prediction,
                          learn_sigma=False, num_classes=len(CLASSES), null_label=dit.null_class_id,
                          latent_shape=LATENT, classes=CLASSES, image_channels=1, image_size=8,
                          sampling={"guidance": GUIDANCE})
    return str(out), meta


def distill_cfg(method="progressive", **train) -> DistillConfig:
    train = {"max_steps": 30, "batch_size": 32, "lr": 1e-3, "ema_decay": 0.9, "log_every": 10,
             "checkpoint_every": 1000, **train}
    return DistillConfig(method=method, progressive={"start_steps": 8, "end_steps": 4},
                         consistency={"num_levels": 8, "sample_levels": [400]}, train=train)


def progressive_task(tmp_path, cfg=None, **kwargs) -> ProgressiveTask:
    directory, teacher = teacher_dir(tmp_path)
    levels = spaced_timesteps(1000, 8, "trailing")
    meta = metas.student_meta(teacher, teacher_levels=levels.tolist(), levels=levels[::2].tolist(), native_steps=4,
                              teacher_cfg_weight=GUIDANCE, method="progressive", guidance=GUIDANCE).to_json()
    ref = (directory, "dit.safetensors")
    return ProgressiveTask(cfg or distill_cfg(), meta, init=ref, teacher=ref, in_memory=synthetic_latents(), **kwargs)


def consistency_task(tmp_path, method="consistency_distillation", cfg=None, task_class=ConsistencyTask,
                     **kwargs) -> ConsistencyTask:
    directory, teacher = teacher_dir(tmp_path)
    cfg = cfg or distill_cfg(method)
    levels = consistency_levels(NoiseSchedule.from_name("scaled_linear", 1000), cfg.consistency.num_levels)
    meta = metas.student_meta(teacher, consistency_levels=levels.tolist(),
                              sample_levels=[int(levels[len(levels) // 2])], native_steps=1, teacher_cfg_weight=GUIDANCE, method=method, guidance=GUIDANCE).to_json()
    ref = (directory, "dit.safetensors")
    return task_class(cfg, meta, init=ref, teacher=ref if method.endswith("distillation") else None,
                      in_memory=synthetic_latents(), **kwargs)


# ---------------------------------------------------------------- the targets


def test_progressive_target_against_a_brute_force_two_step_teacher(tmp_path):
    task = progressive_task(tmp_path)
    schedule = task.schedule
    x0, labels = synthetic_latents(6)
    teacher = task.build_model()  # the student starts as the teacher: the same weights
    guided = make_cfg_model_fn(lambda x, t, y: teacher.eval()(x, t, y), teacher.null_class_id, GUIDANCE)
    levels = task.meta["teacher_levels"]
    for i in range(len(levels) // 2):  # every student step, the last one ending on clean data
        t, t_mid = levels[2 * i], levels[2 * i + 1]
        t_end = levels[2 * i + 2] if 2 * i + 2 < len(levels) else -1
        z_t = schedule.alphas_cumprod[t].sqrt() * x0 + (1 - schedule.alphas_cumprod[t]).sqrt() * torch.randn_like(x0)
        z_t = z_t.float()
        # brute force: the library's DDIM step, twice, with the guided teacher
        with torch.no_grad():
            batch_t = torch.full((6,), t)
            z_mid, _ = ddim_step(schedule, guided(z_t, batch_t, labels), z_t, t, t_mid, prediction="v")
            z_end, _ = ddim_step(schedule, guided(z_mid, torch.full((6,), t_mid), labels), z_mid, t_mid, t_end,
                                 prediction="v")
        full = lambda v: torch.full((6,), v)  # noqa: E731
        target = task.teacher_target(z_t, labels, full(t), full(t_mid), full(t_end), torch.float32)
        one_step, _ = ddim_step(schedule, target, z_t, t, t_end, prediction="x0")
        torch.testing.assert_close(one_step, z_end, atol=2e-4, rtol=1e-4)
        if t_end == -1:
            torch.testing.assert_close(target, z_end, atol=1e-5, rtol=1e-5)


def test_consistency_function_is_the_identity_at_the_boundary(tmp_path):
    task = consistency_task(tmp_path)
    schedule = task.schedule
    levels = consistency_levels(schedule, 18)
    assert int(levels[0]) == 0 and int(levels[-1]) == 999 and bool((levels[1:] > levels[:-1]).all())
    fn = ConsistencyFunction(schedule, levels)
    model = task.build_model().eval()
    x = 3 * torch.randn(5, *LATENT)
    y = torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        assert torch.equal(fn(model, x, torch.zeros(5, dtype=torch.long), y), x)
        # away from the boundary f is the network's denoiser, close to the teacher's x0 at high noise
        top = torch.full((5,), len(levels) - 1)
        teacher_x0 = fn.teacher_denoiser(lambda z, t, yy: model(z, t, yy), y)(x, fn.sigmas[top].float())
        assert not torch.equal(fn(model, x, top, y), x)
        torch.testing.assert_close(fn(model, x, top, y), teacher_x0, atol=0.05 * float(teacher_x0.abs().max()),
                                   rtol=0.05)
    assert [ct_num_levels(k, 100, 2, 18) for k in (0, 50, 100)] == [2, 13, 18]


# ---------------------------------------------------------------- training


class Recording:
    """Mixin: keeps every step's loss (one process, so the list is the test's)."""

    def loss(self, model, batch, step, generator):
        loss, extras = super().loss(model, batch, step, generator)
        self.losses.append(float(loss.detach()))
        return loss, extras


@pytest.mark.parametrize("method", ["progressive", "consistency_distillation", "consistency_training"])
def test_a_student_moves_toward_its_target(tmp_path, method):
    if method == "progressive":
        base = progressive_task(tmp_path, distill_cfg(lr=2e-3))
    else:
        base = consistency_task(tmp_path, method, distill_cfg(method, lr=2e-3))
    task = type("RecordingTask", (Recording, type(base)), {})(base.cfg, base.meta, base.init, base.teacher_ref,
                                                                in_memory=base.in_memory)
    task.losses = []
    final = train_loop(task, task.cfg.train, LocalSession(tmp_path / "ckpt"), None)
    assert final["step"] == 30 and all(torch.isfinite(torch.tensor(task.losses)))
    first, last = statistics.mean(task.losses[:6]), statistics.mean(task.losses[-6:])
    if method != "consistency_training":  # CT's discretisation grows during the run: its loss is not comparable
        assert last < 0.8 * first, (first, last)
    else:
        assert final["levels"] > 2


def test_consistency_distillation_in_bf16_runs_the_fp32_target_in_bf16(tmp_path):
    """On a GPU the target network's fp32 forward cost as much as the rest of the step: its
    weights stay fp32 (the EMA), its forward runs in the compute dtype."""
    task = consistency_task(tmp_path, cfg=distill_cfg("consistency_distillation", max_steps=3,
                                                      precision="bf16", zero_stage=2))
    output_dtypes, build = [], task.target

    def hooked_target(like):
        net = build(like)
        if not output_dtypes:
            net.final_layer.register_forward_hook(lambda module, args, out: output_dtypes.append(out.dtype))
        return net

    task.target = hooked_target
    final = train_loop(task, task.cfg.train, LocalSession(tmp_path / "ckpt"), None)
    assert final["step"] == 3 and torch.isfinite(torch.tensor(final["loss"]))
    assert set(output_dtypes) == {torch.bfloat16} and len(output_dtypes) == 3
    assert {p.dtype for p in task._target.parameters()} == {torch.float32}


def test_consistency_resume_restores_the_target_network(tmp_path):
    cfg = distill_cfg("consistency_distillation", max_steps=10, checkpoint_every=4)
    straight = consistency_task(tmp_path, cfg=cfg)
    train_loop(straight, cfg.train, LocalSession(tmp_path / "a"), None)
    crashed = consistency_task(tmp_path, cfg=cfg, task_class=crashing(ConsistencyTask, at_step=6))
    with pytest.raises(RuntimeError, match="injected failure at step 6"):
        train_loop(crashed, cfg.train, LocalSession(tmp_path / "b"), None)
    resumed = consistency_task(tmp_path, cfg=cfg)
    final = train_loop(resumed, cfg.train, LocalSession(tmp_path / "b"), None)
    assert final["step"] == 10
    for (name, a), b in zip(straight._target.state_dict().items(), resumed._target.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    start = consistency_task(tmp_path, cfg=cfg).build_model().state_dict()
    assert any(not torch.equal(start[k], v) for k, v in resumed._target.state_dict().items())


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("method,steps", [("progressive", 4), ("consistency_distillation", 1),
                                          ("consistency_distillation", 2)])
def test_sampling_each_method(tmp_path, method, steps):
    task = progressive_task(tmp_path) if method == "progressive" else consistency_task(tmp_path, method)
    student, meta = task.build_model().eval(), json.loads(json.dumps(task.meta))
    ae, ae_meta = tiny_autoencoder()
    calls = []
    student.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    labels = [0, 1, 2, 2, 1]
    images = generate_student(student, meta, ae, ae_meta, labels, steps=steps, batch_size=5)
    assert images.shape == (5, 1, 8, 8) and images.dtype == torch.uint8
    assert calls == [5] * steps  # guidance is folded in: one evaluation per step
    assert_same_up_to_rounding(images, generate_student(student, meta, ae, ae_meta, labels, steps=steps, batch_size=2))
    assert not torch.equal(images, generate_student(student, meta, ae, ae_meta, labels, steps=steps, seed=1))
    assert steps in supported_steps(meta)
    with pytest.raises(ValueError, match="samples with"):
        generate_student(student, meta, ae, ae_meta, labels, steps=3)


# ---------------------------------------------------------------- finished rounds


def forge(output, rel: str, data: bytes, claimed: str) -> None:
    """Overwrite ``rel``; on S3 with metadata claiming the old sha256, as anyone who can write there can."""
    if output.is_local:
        output.write_bytes(rel, data)
    else:
        output.client.put_object(Bucket=output.bucket, Key=output.key(rel), Body=data, Metadata={"sha256": claimed})


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_finished_round_is_kept_only_while_its_files_hash_as_round_json_recorded(tmp_path, request, where):
    """round.json records each round file's sha256; a later run refuses a round whose file changed,
    even on S3 where the object's recorded sha256 (metadata) is rewritten along with it."""
    import hashlib

    from components.common.checkpoint import CheckpointError
    from components.common.storage import Storage
    from components.distill.train import ROUND_FILES, finished_round, mark_round_done

    root = f"s3://{request.getfixturevalue('s3_bucket')}/distill" if where == "s3" else str(tmp_path / "distill")
    output = Storage.from_uri(root)
    assert finished_round(output, "round_1") is None  # not done
    for name in ROUND_FILES:
        output.write_bytes(f"round_1/{name}", f"{name} as round 1 wrote it".encode())
    mark_round_done(output, "round_1", {"round": 1, "loss": 0.25})
    recorded = json.loads(output.read_text("round_1/round.json"))["files"]
    assert recorded == {n: hashlib.sha256(f"{n} as round 1 wrote it".encode()).hexdigest() for n in ROUND_FILES}
    assert finished_round(output, "round_1")["loss"] == 0.25

    forge(output, "round_1/distill.safetensors", b"someone else's weights", claimed=recorded["distill.safetensors"])
    assert output.sha256("round_1/distill.safetensors") == recorded["distill.safetensors"] or where == "local"
    refusal = "round_1/distill.safetensors: sha256 differs from the one round_1/round.json recorded"
    with pytest.raises(CheckpointError, match=f"{refusal}.*delete .*round_1 and .*_checkpoints/round_1 to train"):
        finished_round(output, "round_1")
    output.write_text("round_1/round.json", json.dumps({"round": 1, "loss": 0.25}))  # as older code wrote it
    with pytest.raises(CheckpointError, match="round_1/round.json: records no sha256 of the round's files"):
        finished_round(output, "round_1")


# ---------------------------------------------------------------- the step: Ray Train, interrupted and resumed


def dit_step_output(root, classes: list[str]):
    """A DiT step's output (v-prediction, untrained but perturbed) as the distill step's teacher."""
    from components.common.step import FileRecord, Manifest
    from components.common.storage import Storage

    kwargs, dit = perturbed_dit(len(classes))
    out = root / "dit"
    out.mkdir()
    save_file(dit.state_dict(), str(out / "dit.safetensors"))
    meta = metas.dit_meta(model=kwargs, schedule="scaled_linear", num_timesteps=1000, prediction="v",
                          learn_sigma=False, num_classes=len(classes), null_label=dit.null_class_id,
                          latent_shape=LATENT, classes=classes, image_channels=1, image_size=8,
                          sampling={"guidance": GUIDANCE}).to_json()
    (out / "dit.json").write_text(json.dumps(meta))
    storage = Storage.from_uri(str(out))
    files = [FileRecord(p, storage.sha256(p), storage.size(p)) for p in ("dit.safetensors", "dit.json")]
    return Manifest(step="dit", cache_key="k", code_version="1", location=str(out), config={}, upstream={},
                    files=files, info=meta)


@pytest.mark.integration
def test_progressive_step_resumes_inside_the_round_it_was_in(ray_cluster, tmp_path, monkeypatch):
    from components.common.train_types import TrainingError
    from components.distill.train import TASK_CLASSES, run as distill
    from tests.test_dit import mlflow_tracker, step_ctx, tiny_latent_inputs

    inputs = tiny_latent_inputs(tmp_path)
    inputs = {"autoencoder": inputs["autoencoder"], "latents": inputs["latents"],
              "dit": dit_step_output(tmp_path, inputs["shard"].info["classes"])}

    tracker = mlflow_tracker(tmp_path)
    cfg = DistillConfig(progressive={"start_steps": 8, "end_steps": 2}, grid_per_label=2, grid_classes=3,
                        train={"max_steps": 6, "batch_size": 16, "lr": 1e-3, "ema_decay": 0.8, "log_every": 1,
                               "checkpoint_every": 2, "zero_stage": 2})
    ctx = step_ctx(tmp_path, "distill", tracker)
    # round 2 fails at its step 3, after its step-2 checkpoint
    monkeypatch.setitem(TASK_CLASSES, "progressive", crashing(ProgressiveTask, at_step=3, in_round=2))
    with pytest.raises(TrainingError, match="injected failure at step 3"):
        distill(cfg, inputs, ctx)
    assert ctx.output.exists("round_1/round.json") and not ctx.output.exists("round_2/round.json")
    round_1 = ctx.output.read_bytes("round_1/distill.safetensors")
    monkeypatch.setitem(TASK_CLASSES, "progressive", ProgressiveTask)
    out = distill(cfg, inputs, ctx)

    client = tracker.client
    children = client.search_runs([client.get_run(tracker.run_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{tracker.run_id}'")
    names = sorted((r.info.run_name, r.info.status) for r in children)
    # round 1 ran once (kept, not retrained); round 2 failed once and then finished
    assert names == [("round 1: 8 -> 4 steps", "FINISHED"), ("round 2: 4 -> 2 steps", "FAILED"),
                     ("round 2: 4 -> 2 steps", "FINISHED")], names
    assert ctx.output.read_bytes("round_1/distill.safetensors") == round_1
    resumed = next(r for r in children if r.info.status == "FINISHED" and r.info.run_name.startswith("round 2"))
    logged = [m.step for m in client.get_metric_history(resumed.info.run_id, "loss")]
    assert logged and min(logged) > 1 and max(logged) == 6, logged  # went on from a checkpoint, not from 0

    meta = json.loads(ctx.output.read_text("distill.json"))
    assert meta["native_steps"] == 2 and meta["levels"] == [999, 499] and meta["round"] == 2
    assert meta["teacher_levels"] == [999, 749, 499, 249] and meta["guidance"] == GUIDANCE
    assert out.info["native_steps"] == 2 and "samples.png" in out.files and "round_2/samples.png" in out.files
    for name in out.files:
        assert ctx.output.exists(name), name
    from components.distill.load import load_student

    student, _ = load_student(ctx.output)
    ae, ae_meta = tiny_autoencoder()
    assert generate_student(student, meta, ae, ae_meta, [0, 1], seed=3).shape == (2, 1, 8, 8)

    # A finished round's file changed since its round.json: the next run refuses it, before training.
    from components.common.checkpoint import CheckpointError

    assert set(json.loads(ctx.output.read_text("round_1/round.json"))["files"]) == \
        {"distill.safetensors", "distill_raw.safetensors", "distill.json", "samples.png"}
    weights = bytearray(round_1)
    weights[len(weights) // 2] ^= 0x01
    ctx.output.write_bytes("round_1/distill.safetensors", bytes(weights))
    with pytest.raises(CheckpointError, match="round_1/distill.safetensors: sha256 differs"):
        distill(cfg, inputs, ctx)
    assert len(client.search_runs([client.get_run(tracker.run_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{tracker.run_id}'")) == 3  # no round started


def test_lpips_distance_uses_local_weights_only(tmp_path):
    from components.autoencoder.lpips import LPIPS
    from tests.test_dit import untrained_autoencoder_manifest

    with pytest.raises(ValueError, match="lpips_weights"):
        DistillConfig(method="consistency_distillation", consistency={"distance": "lpips"})
    weights = tmp_path / "lpips_vgg.safetensors"
    torch.manual_seed(0)
    save_file(LPIPS().state_dict(), str(weights))  # the real layout; random values will do here
    cfg = distill_cfg("consistency_distillation", max_steps=3)
    cfg.consistency = {**cfg.consistency.model_dump(), "distance": "lpips", "lpips_weights": str(weights)}
    base = consistency_task(tmp_path, cfg=cfg)
    task = ConsistencyTask(cfg, base.meta, base.init, base.teacher_ref, in_memory=base.in_memory,
                           autoencoder=untrained_autoencoder_manifest(tmp_path, CLASSES))
    final = train_loop(task, cfg.train, LocalSession(tmp_path / "ckpt"), None)
    assert final["step"] == 3 and final["loss"] > 0 and final["grad_norm"] > 0
