"""DDIM interpolation (Song et al. 2021, sec. 5.3): slerp's own properties, and ``latentflow sample
--interpolate A,B --frames K`` on a workflow's files: seed ends reproduce ``latentflow sample`` bit for bit,
an image end comes back within DDIM inversion's round trip, bad arguments are refused by name."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from typer.testing import CliRunner

from components.diffusion.interpolation import frame_alphas, interpolation_path, slerp
from pipelines.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")


def angle(u: torch.Tensor, v: torch.Tensor) -> float:
    u, v = u.flatten().double(), v.flatten().double()
    return math.acos(float((u @ v) / (u.norm() * v.norm())))


def test_slerp_walks_the_great_circle_at_constant_speed():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    b = b * a.norm() / b.norm()  # ends on one sphere: the path stays on it, its angle grows linearly
    theta = angle(a, b)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    for alpha in (0.25, 0.5, 0.8):
        mid = slerp(a, b, alpha)
        assert angle(a, mid) == pytest.approx(alpha * theta, rel=1e-5)
        assert angle(mid, b) == pytest.approx((1 - alpha) * theta, rel=1e-5)
        assert float(mid.norm()) == pytest.approx(float(a.norm()), rel=1e-5)
    # orthonormal ends: every point has norm 1 (a straight line would dip to 1/sqrt(2) halfway)
    e1, e2 = torch.zeros(1, 3), torch.zeros(1, 3)
    e1[0, 0], e2[0, 1] = 1.0, 1.0
    half = slerp(e1, e2, 0.5)
    torch.testing.assert_close(half, torch.tensor([[2**-0.5, 2**-0.5, 0.0]]))
    torch.testing.assert_close(slerp(e1, 3 * e1, 0.5), 2 * e1)  # parallel ends: the straight line
    batch = slerp(torch.cat([a, b]), torch.cat([b, a]), 0.3)  # per sample
    torch.testing.assert_close(batch[1], slerp(b, a, 0.3)[0])
    path = interpolation_path(a, b, 5)
    assert path.shape == (5, 4, 8, 8) and torch.equal(path[0], a[0]) and torch.equal(path[-1], b[0])
    assert frame_alphas(3) == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="shapes"):
        slerp(a, b[:, :2], 0.5)
    with pytest.raises(ValueError, match="alpha"):
        slerp(a, b, 1.5)
    with pytest.raises(ValueError, match="at least 2 frames"):
        frame_alphas(1)


def invoke(*args: str):
    return CliRunner().invoke(app, ["sample", *args], env={"COLUMNS": "200", "NO_COLOR": "1"})


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    from test_score_samplers import write_workflow

    root = tmp_path_factory.mktemp("interpolate")
    write_workflow(root)
    return root


def test_seed_ends_are_latentflow_samples_images_bit_for_bit(workflow, tmp_path):
    common = ["--workflow-id", "wf", "--storage", str(workflow)]
    run = invoke(*common, "--interpolate", "3,5", "--frames", "4", "--labels", "1", "--out", str(tmp_path / "i"))
    assert run.exit_code == 0, run.output
    assert "4 frames of 1 from 3 to 5" in run.output and "ddim, 4 steps" in run.output
    frames = [(tmp_path / "i" / f"frame_{k}.png").read_bytes() for k in range(4)]
    assert (tmp_path / "i" / "strip.png").is_file()
    for seed, frame in ((3, frames[0]), (5, frames[-1])):
        plain = invoke(*common, "--seed", str(seed), "--labels", "1", "--per-label", "1", "--sampler", "ddim",
                       "--eta", "0", "--out", str(tmp_path / f"s{seed}"))
        assert plain.exit_code == 0, plain.output
        assert (tmp_path / f"s{seed}" / "1" / "0.png").read_bytes() == frame, seed
    assert len(set(frames)) == 4  # the middle frames are images of their own
    from PIL import Image

    assert Image.open(tmp_path / "i" / "strip.png").size == (4 * 8 + 5 * 2, 8 + 2 * 2)


def test_an_image_end_comes_back_within_the_inversions_round_trip(workflow, tmp_path):
    """Frame 0 of an image end is exactly decode(DDIM(invert(encode(image)))): the pipeline adds nothing to the
    round trip's own error, which is measured here: in latent space, and in pixels against the autoencoder's
    reconstruction of the image (the closest any x_T can come back through this untrained autoencoder)."""
    import numpy as np
    from PIL import Image

    from components.autoencoder.load import decode_scaled, encode_scaled
    from components.common.images import to_uint8
    from components.diffusion import NoiseSchedule, ddim_sample, spaced_timesteps
    from components.dit.config import SamplingConfig
    from components.dit.generate import dit_denoiser, generate, invert
    from pipelines.sample_interpolate import read_image
    from test_score_samplers import tiny_autoencoder, untrained_dit

    common = ["--workflow-id", "wf", "--storage", str(workflow), "--labels", "0", "--steps", "50"]
    assert invoke(*common, "--seed", "11", "--per-label", "1", "--out", str(tmp_path / "s")).exit_code == 0
    image_file = tmp_path / "s" / "0" / "0.png"
    run = invoke(*common, "--interpolate", f"{image_file},4", "--frames", "3", "--out", str(tmp_path / "i"))
    assert run.exit_code == 0, run.output
    frame = lambda k: np.asarray(Image.open(tmp_path / "i" / f"frame_{k}.png"), dtype=np.float64)  # noqa: E731

    dit, meta = untrained_dit(learn_sigma=False)  # the weights write_workflow stored
    ae, ae_meta = tiny_autoencoder()
    sampling = SamplingConfig(steps=50, guidance=1.0)
    image = read_image(image_file, dataclasses.replace(ae_meta, channels=1))
    x_T = invert(dit, meta, ae, ae_meta, image, [0], sampling)
    round_trip = generate(dit, meta, ae, ae_meta, [0], sampling, x_T=x_T)[0, 0].numpy()
    assert np.array_equal(frame(0), round_trip)
    schedule = NoiseSchedule.from_name(meta.schedule, 1000)
    z0 = encode_scaled(ae, ae_meta, image)
    with torch.no_grad():
        back = ddim_sample(dit_denoiser(dit, meta, sampling, schedule), x_T, spaced_timesteps(1000, 50, "trailing"),
                           schedule, extra_args={"y": torch.tensor([0])})
    latent_error = float((back - z0).norm() / z0.norm())
    reconstruction = to_uint8(decode_scaled(ae, ae_meta, z0))[0, 0].numpy().astype(np.float64)
    gap, other = np.abs(frame(0) - reconstruction).mean(), np.abs(frame(2) - reconstruction).mean()
    print(f"\nround trip (50 steps, untrained DiT): |z - z0|/|z0| = {latent_error:.3f}; mean |frame_0 - AE "
          f"reconstruction| = {gap:.1f}/255 (seed 4's frame: {other:.1f}/255); image vs frame_0 "
          f"{np.abs(frame(0) - image[0, 0].numpy()).mean():.1f}/255")
    assert latent_error < 0.2 and gap < 0.5 * other
    assert "frame differs from the image by" in run.output


@pytest.mark.parametrize("args,named", [
    (["--interpolate", "3", "--frames", "3"], "--interpolate"),
    (["--interpolate", "3,no-such.png", "--frames", "3"], "--interpolate"),
    (["--interpolate", "3,4", "--frames", "1"], "--frames"),
    (["--interpolate", "3,4"], "--frames"),
    (["--frames", "3"], "--interpolate"),
    (["--interpolate", "3,4", "--frames", "3", "--per-label", "2"], "--per-label"),
    (["--interpolate", "3,4", "--frames", "3", "--eta", "0.5"], "--eta"),
], ids=["one-end", "missing-image", "one-frame", "no-frames", "frames-alone", "per-label", "eta"])
def test_bad_arguments_are_refused_by_name(workflow, tmp_path, args, named):
    help_text = invoke("--help").output
    assert all(flag in help_text for flag in ("--interpolate", "--frames", "--fixed-variance", "strip.png"))
    run = invoke("--workflow-id", "wf", "--storage", str(workflow), "--labels", "1", *args, "--out", str(tmp_path))
    assert run.exit_code == 2 and named in run.output, run.output
