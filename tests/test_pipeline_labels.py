"""A class-conditional checkpoint called without labels samples its class mixture (issue 13)."""

from __future__ import annotations

import pytest
import torch

import flowdiff as fd
from flowdiff.pipeline import ClassMixtureModel, load_field


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    from typer.testing import CliRunner

    from flowdiff.cli import app

    out = tmp_path_factory.mktemp("cond") / "run"
    result = CliRunner().invoke(app, ["train", "--data", "digits", "--network", "mlp", "--steps", "3", "--batch", "16",
                                      "--checkpoint-every", "3", "--label-dropout", "0.1", "--prediction", "data",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_unlabelled_calls_draw_stratified_classes_fixed_per_row(conditional_run):
    field, _ = load_field(conditional_run)
    assert isinstance(field.model, ClassMixtureModel) and field.model.num_classes == 10
    labels = field.model.labels(30, torch.device("cpu"))
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 3))  # exact class counts
    assert torch.equal(labels, field.model.labels(30, torch.device("cpu")))  # the same classes on every call
    x0 = field.path.prior_sample((30, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    default = fd.sample(field, x0, nfe=6).x
    explicit = fd.sample(field, x0, nfe=6, cond={"y": labels}).x
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    # The null-label network is what unlabeled="null" gives, and it differs from the mixture.
    null_field, _ = load_field(conditional_run, unlabeled="null")
    assert not isinstance(null_field.model, ClassMixtureModel)
    null = fd.sample(null_field, x0, nfe=6).x
    torch.testing.assert_close(null, fd.sample(field, x0, nfe=6, cond={"y": torch.full((30,), 10)}).x, rtol=0, atol=0)
    assert (null - default).abs().max() > 1e-4


def test_mixture_field_has_no_density_without_labels_and_bad_option(conditional_run):
    field, _ = load_field(conditional_run)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="unlabeled='null'"):
        fd.log_likelihood(field, x, nfe=4, refine_tol=None)
    with_labels = fd.log_likelihood(field, x, nfe=4, refine_tol=None, cond={"y": torch.tensor([1, 2])})
    assert torch.isfinite(with_labels.log_prob).all()
    null_field, _ = load_field(conditional_run, unlabeled="null")
    assert torch.isfinite(fd.log_likelihood(null_field, x, nfe=4, refine_tol=None).log_prob).all()
    with pytest.raises(ValueError, match="unlabeled must be 'mixture' or 'null', got 'none'"):
        load_field(conditional_run, unlabeled="none")
