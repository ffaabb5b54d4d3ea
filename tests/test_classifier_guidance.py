"""Classifier guidance: the log-probability gradient against finite differences, the same ε̄ in every
parameterisation, and guidance raising the guided class's probability of DDIM samples."""

from __future__ import annotations

import pytest
import torch

from components.diffusion import NoiseSchedule, ddim_sample, predict_x0_eps, spaced_timesteps
from components.diffusion.classifier_guidance import classifier_log_prob_grad, make_classifier_guided_model_fn
from components.diffusion.process import predict_eps_from_x0, v_from_x0_eps

SHAPE = (3, 4, 4)


class TinyNoisyClassifier(torch.nn.Module):
    """Logits of (x_t, t): a linear read-out whose weights depend on t through a tanh gate."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.read = torch.nn.Linear(48, num_classes)
        self.time = torch.nn.Linear(1, 48)

    def forward(self, x, t):
        gate = torch.tanh(self.time(t.to(x.dtype).view(-1, 1) / 1000))
        return self.read(torch.tanh(x.flatten(1) * (1 + gate)))


def test_gradient_matches_finite_differences():
    classifier = TinyNoisyClassifier().double()
    x = torch.randn(2, *SHAPE, dtype=torch.float64)
    t, y = torch.tensor([10, 700]), torch.tensor([2, 0])
    grad = classifier_log_prob_grad(classifier, x, t, y)

    def log_prob(z):
        return torch.log_softmax(classifier(z, t), -1)[torch.arange(2), y]

    h = 1e-6
    for index in [(0, 0, 1, 2), (0, 2, 3, 3), (1, 1, 0, 0), (1, 0, 2, 1)]:
        step = torch.zeros_like(x)
        step[index] = h
        numeric = (log_prob(x + step) - log_prob(x - step))[index[0]] / (2 * h)
        assert grad[index].item() == pytest.approx(numeric.item(), rel=1e-6, abs=1e-9)
    # example 0's gradient does not depend on example 1 (the batch sum separates)
    other = x.clone()
    other[1] += 1.0
    assert torch.equal(classifier_log_prob_grad(classifier, other, t, y)[0], grad[0])


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_every_parameterisation_gets_the_same_guided_eps(prediction):
    schedule = NoiseSchedule.from_name("linear", 1000)
    classifier = TinyNoisyClassifier().double()
    x_t, t, y = torch.randn(4, *SHAPE, dtype=torch.float64), torch.tensor([5, 200, 600, 999]), torch.tensor([0, 1, 2, 1])
    eps_model = lambda x, tt, yy: torch.sin(x)  # noqa: E731 - some ε prediction

    def as_prediction(x, tt, yy):  # the same model, written in another parameterisation
        eps = eps_model(x, tt, yy)
        x0, _ = predict_x0_eps(schedule, eps, x, tt, "eps")
        return x0 if prediction == "x0" else v_from_x0_eps(schedule, x0, tt, eps)

    guided_eps = make_classifier_guided_model_fn(eps_model, classifier, schedule, 2.5, "eps")(x_t, t, y)
    other = make_classifier_guided_model_fn(as_prediction, classifier, schedule, 2.5, prediction)(x_t, t, y)
    _, eps_from_other = predict_x0_eps(schedule, other, x_t, t, prediction)
    torch.testing.assert_close(eps_from_other, guided_eps, rtol=1e-9, atol=1e-9)
    # and by definition: ε̄ = ε − w √(1−ᾱ) ∇ log f
    sigma = schedule.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = torch.sin(x_t) - 2.5 * sigma * classifier_log_prob_grad(classifier, x_t, t, y)
    torch.testing.assert_close(guided_eps, expected, rtol=1e-12, atol=1e-12)
    unguided = make_classifier_guided_model_fn(eps_model, classifier, schedule, 0.0, "eps")(x_t, t, y)
    assert torch.equal(unguided, torch.sin(x_t))
    x0_check = predict_eps_from_x0(schedule, x_t, t, predict_x0_eps(schedule, other, x_t, t, prediction)[0])
    torch.testing.assert_close(x0_check, guided_eps, rtol=1e-9, atol=1e-9)


def test_guidance_raises_the_guided_class_probability():
    """Data: N(0, I); its exact ε-model is ε(x_t) = √(1−ᾱ_t) x_t. A fixed classifier on x_t; DDIM from
    the same noise with guidance toward class 1 ends where the classifier gives class 1 more weight."""
    schedule = NoiseSchedule.from_name("linear", 1000)
    classifier = TinyNoisyClassifier()
    oracle = lambda x, t, y: schedule.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1).float() * x  # noqa: E731
    noise = torch.randn(256, *SHAPE, generator=torch.Generator().manual_seed(0))
    labels = torch.ones(256, dtype=torch.long)
    timesteps = spaced_timesteps(1000, 25, "leading")
    probability = []
    for weight in (0.0, 1.0, 4.0):
        fn = make_classifier_guided_model_fn(oracle, classifier, schedule, weight, "eps")
        samples = ddim_sample(fn, noise.clone(), timesteps, schedule, extra_args={"y": labels})
        with torch.no_grad():
            probs = torch.softmax(classifier(samples, torch.zeros(256, dtype=torch.long)), -1)[:, 1]
        probability.append(probs.mean().item())
    assert probability[0] < probability[1] < probability[2], probability
    assert probability[2] > probability[0] + 0.1, probability
