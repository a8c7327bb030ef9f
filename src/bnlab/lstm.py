"""The recurrent model of ``TrainConfig(model="lstm")``: an MNIST image read as a sequence by an LSTM or a BN-LSTM.

The sequential-MNIST setup of Cooijmans et al., *Recurrent Batch Normalization* (ICLR 2017)::

    images (N, 1, 28, 28) -> a sequence (N, T, F) per config.task -> BNLSTM(F, hidden, max_steps=T)
                          -> the last hidden state h_T (N, hidden) -> Linear -> (N, 10) logits

``task`` decides how an image becomes a sequence:

    "row"       28 steps of 28 pixels (one image row per step): short, easy; not in the paper
    "pixel"     784 steps of 1 pixel, in reading order (the paper's "sequential MNIST")
    "permuted"  784 steps of 1 pixel in a fixed random order (the paper's pMNIST): the order is drawn
                once from ``PERMUTATION_SEED``, the same for every run and seed, and kept in the
                state_dict (buffer ``permutation``) so a checkpoint reloads the order it trained with

The classifier takes images, not sequences, so everything that scores an image classifier (evaluation,
the one-at-a-time check, precise statistics, checkpoints, ``bnlab check``) works on it unchanged.

``bn`` maps to the recurrent layer as follows: ``"none"`` is the plain LSTM (``BNLSTM(bn=False)``, the
same ops and initialisation), ``"manual"`` the BN-LSTM on bnlab's ``batch_norm``. ``"torch"`` is
refused: the BN-LSTM normalizes every step with its own statistics (``SequenceBatchNorm``), which
PyTorch's BN layers do not offer, and training bnlab's BN under the name "torch" would label two
configs (two run directories, two rows of a table) for one and the same network.

Settings of the paper's setup that are not in ``TrainConfig``: gamma starts at 0.1 for every BN site,
h_0 gets Gaussian noise of std 0.1 in training (both models, so a comparison isolates BN), the forget
gate's bias starts at 1, W_h is an identity per gate block, W_x and the output layer are orthogonal
(the authors' ``sequential_mnist.py``). ``bn_momentum`` (if set) replaces the statistics' momentum of
0.1, as for every model (``bnlab.models.build_network``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bnlab.config import TrainConfig
from bnlab.errors import UsageError
from bnlab.nn.recurrent import BNLSTM

__all__ = ["H0_NOISE_STD", "PERMUTATION_SEED", "SequenceClassifier", "parameter_count", "pixel_permutation"]

IMAGE_SIZE = 28
PIXELS = IMAGE_SIZE * IMAGE_SIZE
CLASSES = 10
SEQUENCES = {"row": (IMAGE_SIZE, IMAGE_SIZE), "pixel": (PIXELS, 1), "permuted": (PIXELS, 1)}  # task -> (T, F)
H0_NOISE_STD = 0.1  # experiments/sequentialmnist_bnlstm.sh of the authors
BN_MOMENTUM = 0.1  # the statistics' momentum unless TrainConfig.bn_momentum sets one (PyTorch's default)
PERMUTATION_SEED = 0  # pMNIST's pixel order: one fixed draw, independent of the run's seed


def sequence_shape(task: str) -> tuple[int, int]:
    """(steps, features per step) of ``task``'s view of an MNIST image."""
    if task not in SEQUENCES:
        raise UsageError(f"task must be one of {', '.join(SEQUENCES)}; got {task!r}")
    return SEQUENCES[task]


def pixel_permutation() -> Tensor:
    """pMNIST's pixel order (784,) int64: re-derivable from ``PERMUTATION_SEED`` alone, so every run shares it."""
    return torch.randperm(PIXELS, generator=torch.Generator().manual_seed(PERMUTATION_SEED))


def _check_config(config: TrainConfig) -> None:
    """Refuse what the lstm model cannot honour, by name, before anything is built."""
    if config.model != "lstm":
        raise UsageError(f"SequenceClassifier builds the lstm model; got model {config.model!r}")
    if config.bn == "torch":
        raise UsageError(
            "the lstm model has no PyTorch variant of batch norm: its statistics are kept per time step, which "
            "torch.nn's BN layers cannot do; use bn='manual' for the BN-LSTM (bnlab's batch norm) or 'none'"
        )
    if config.dead_units:
        raise UsageError("dead_units counts silent ReLU units; the lstm model has none (set dead_units=False)")
    if config.init != "auto":
        raise UsageError(f"the lstm model uses the paper's initialisation only (init='auto'); got {config.init!r}")


class SequenceClassifier(nn.Module):
    """MNIST images classified by a one-layer (BN-)LSTM reading them as sequences (see the module docstring).

    Weights are drawn from ``generator`` in a fixed order (W_x, then the output layer); everything else
    starts at a constant. An LSTM and a BN-LSTM built from the same generator state therefore share
    every weight they have in common: a paired comparison isolates batch norm.
    """

    def __init__(self, config: TrainConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        _check_config(config)
        steps, features = sequence_shape(config.task)
        hidden = config.hidden[0]
        self.task = config.task
        self.hparams = {"bn": config.bn, "hidden": hidden, "task": config.task, "steps": steps, "features": features}
        # the layers draw their default weights from the global generator, which h_0's noise comes from:
        # building must leave it where it is (reset_parameters then draws from ``generator``)
        with torch.random.fork_rng(devices=[]):
            momentum = BN_MOMENTUM if config.bn_momentum is None else config.bn_momentum
            self.lstm = BNLSTM(
                features, hidden, max_steps=steps, batch_first=True, bn=config.bn != "none", momentum=momentum,
                h0_noise_std=H0_NOISE_STD,
            )  # fmt: skip
            self.logits = nn.Linear(hidden, CLASSES)
        self.register_buffer("permutation", pixel_permutation() if config.task == "permuted" else None)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The paper's initialisation, the random weights drawn from ``generator`` (W_x, then the output layer)."""
        with torch.random.fork_rng(devices=[]):
            for cell in self.lstm.layers:
                cell.reset_parameters()  # identity W_h, forget bias 1, gammas 0.1, fresh statistics
        for cell in self.lstm.layers:
            nn.init.orthogonal_(cell.weight_ih, generator=generator)
        nn.init.orthogonal_(self.logits.weight, generator=generator)
        nn.init.zeros_(self.logits.bias)

    def sequences(self, images: Tensor) -> Tensor:
        """images (N, 1, 28, 28) -> (N, T, F): rows (N, 28, 28), or pixels (N, 784, 1) in reading or permuted order."""
        if images.dim() != 4 or tuple(images.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"{type(self).__name__} expects images (N, 1, 28, 28), got {tuple(images.shape)}")
        steps, features = self.hparams["steps"], self.hparams["features"]
        pixels = images.reshape(images.shape[0], PIXELS)
        if self.permutation is not None:
            pixels = pixels[:, self.permutation]
        return pixels.reshape(-1, steps, features)

    def forward(self, images: Tensor) -> Tensor:
        # (N, 1, 28, 28) -> (N, T, F) -> h_T (N, hidden) -> (N, 10) logits
        _, (h_n, _) = self.lstm(self.sequences(images))
        return self.logits(h_n[-1])

    def extra_repr(self) -> str:
        return f"task={self.task!r}"


def parameter_count(config: TrainConfig) -> int:
    """Every value the classifier allocates (parameters and buffers), computed from the config without building.

    Buffers count because the BN-LSTM's running statistics are tables of one row per time step:
    at 784 steps they outgrow the weights, so the size guard of ``build_network`` must see them.
    """
    _check_config(config)
    steps, features = sequence_shape(config.task)
    h = config.hidden[0]
    total = 4 * h * (features + h + 1) + (h + 1) * CLASSES  # W_x, W_h, b; the output layer
    if config.bn != "none":
        total += 4 * h + 4 * h + 2 * h  # gamma_x, gamma_h; gamma_c, beta_c
        total += steps * (2 * (4 * h + 4 * h + h) + 3)  # per step: mean and var of each site, three counters
    return total + (PIXELS if config.task == "permuted" else 0)
