"""What the sources claim about each benchmark, in words (REFERENCE §1, §5), for the report."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Claim:
    """One source's claim about one of our model presets."""

    source: str
    models: tuple[str, ...]
    text: str


CLAIMS: tuple[Claim, ...] = (
    Claim(
        source="Tselepidis, Kohler, Orvieto (OPT2020), arXiv 2011.00573",
        models=("mnist_ae", "deep_linear", "cifar10_simple_cnn"),
        text="adding the coarse-space correction to K-FAC improves convergence "
        "(a small set of experiments, the MNIST autoencoder among them)",
    ),
    Claim(
        source="Koroko et al. (2023), arXiv 2303.18083",
        models=("mnist_ae", "curves_ae", "faces_ae", "cifar10_3c3d", "cuda_convnet"),
        text="the coarse correction does not really improve K-FAC on autoencoders and CNNs "
        "(best two-level within ~2 % of K-FAC's final train loss)",
    ),
    Claim(
        source="Koroko et al. (2023), arXiv 2303.18083",
        models=("fmnist_deep_linear",),
        text="the one clear gain: a 64-layer deep linear network with BatchNorm on "
        "Fashion-MNIST, best two-level 0.498 vs K-FAC 0.541 final train loss",
    ),
)


def claims_for(model: str) -> list[Claim]:
    """The sources' claims that concern one of our model presets."""
    return [c for c in CLAIMS if model in c.models]
