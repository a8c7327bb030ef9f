"""Every rule of ``bnlab check``, written once: its title, explanation, detection and fix, and the thresholds.

``bnlab check`` prints a rule's explanation and fix with each finding; docs/check.md holds all of it in a
section generated from this module (``bnlab.check.docs``), which a test compares with the file.

The thresholds live here too, beside the text that states them, so the numbers a finding is judged by
and the numbers the documentation gives cannot part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ERROR", "INFO", "RULES", "WARNING", "Rule"]

ERROR, WARNING, INFO = "error", "warning", "info"  # info: nothing wrong, a gain on offer

FAST_MOMENTUM = 0.5  # momentum-too-large: the statistics average fewer than 2 / momentum - 1 = 3 batches
DRIFT_LIMIT = 0.5  # a layer has drifted: median channel's mean off by 0.5 std, or its std off by e**0.5 = 1.65x
ONE_SAMPLE_GAP = math.log(2.0)  # batch-of-one: channels whose one-sample variance is < 1/2 the population's
ONE_SAMPLE_SIDE = 0.5  # batch-of-one: running_var nearer (in log) the one-sample variance than the population's
ACCURACY_LOSS = 0.01  # stale-stats: accuracy lower by more than 1 point with the stored statistics ...
ERROR_SHARE = 0.25  # ... and by more than a quarter of the errors made with recomputed statistics ...
NOISE_Z = 3.0  # ... and by more than 3 paired standard errors on the held-out inputs
CHANGED_LIMIT = 0.02  # stale-stats without labels: more than 2% of a classifier's predictions change ...
OUTPUT_LIMIT = 0.1  # ... or other outputs move by more than 10% of their spread over the samples ...
NOISE_FACTOR = 3.0  # ... and by more than 3 times as much as between two recomputations from different inputs
TOLERANCE = 1e-3  # batch-dependent: outputs alone and in a batch differ by more than this share of the largest
HALF_TOLERANCE = 3e-2  # the same for float16 and bfloat16 models
FEW_SAMPLES = 8  # small-batch: each training statistic taken over fewer samples than this

_RECOMPUTE = (
    "recompute them with the final weights: `bnlab recalibrate RUN_DIR` for a bnlab run (then check "
    "RUN_DIR/checkpoint-precise.pt), or bnlab.recalibrate(model, training_images) for any model"
)


@dataclass(frozen=True)
class Rule:
    """One kind of finding. ``explanation`` and ``fix`` are printed with every finding (plain text);
    ``detection`` (Markdown, for the documentation) says exactly when it is reported and why there.
    """

    code: str
    severity: str
    scope: str  # "layer": about one BN layer; "model": about the model's outputs
    title: str
    summary: str  # one line, for the documentation's table
    explanation: str
    detection: str
    fix: str


RULES: dict[str, Rule] = {
    rule.code: rule
    for rule in (
        Rule(
            "training-mode",
            ERROR,
            "layer",
            "batch norm left in training mode",
            "BN left in training mode for inference",
            "In training mode batch norm normalizes each sample with the mean and variance of the batch it "
            "arrives in, not with the population statistics it learned: a prediction depends on the other "
            "samples of the batch, and a sample scored alone normalizes to beta.",
            "The layer's `training` flag is set.",
            "Call model.eval() before inference (and model.train() before training again).",
        ),
        Rule(
            "no-running-stats",
            ERROR,
            "layer",
            "no population statistics",
            "`track_running_stats=False`: batch statistics even in eval mode",
            "Built with track_running_stats=False, the layer keeps no running mean and variance, so even in "
            "eval mode it normalizes with the statistics of the current batch: predictions depend on the "
            "batch, and a sample scored alone normalizes to beta.",
            "`running_mean` or `running_var` is `None`.",
            "Build the layer with track_running_stats=True (the default) and train it.",
        ),
        Rule(
            "nonfinite-stats",
            ERROR,
            "layer",
            "population statistics are NaN or infinite",
            "running statistics hold NaN or infinity",
            "running_mean or running_var holds NaN or infinity, so every output in eval mode does too. "
            "Training diverged, or the statistics overflowed in float16.",
            "Any element of `running_mean` or `running_var` is not finite.",
            "Go back to a checkpoint from before the divergence and lower the learning rate, or keep batch "
            "norm in float32 (autocast does).",
        ),
        Rule(
            "stats-at-init",
            ERROR,
            "layer",
            "population statistics never updated",
            "statistics never updated (still mean 0, variance 1)",
            "running_mean is still all 0 and running_var all 1, their initial values: the layer never ran in "
            "training mode on data (or its momentum is 0), so in eval mode it normalizes with mean 0 and "
            "variance 1 instead of its inputs' statistics.",
            "`running_mean` is exactly 0 and `running_var` exactly 1 in every channel (and, for a recurrent "
            "`SequenceBatchNorm`, in every time step's row). Any update with real data changes them, so this "
            "cannot happen by chance. The evidence gives `num_batches_tracked`.",
            f"Train with the model in training mode (model.train()), or {_RECOMPUTE}.",
        ),
        Rule(
            "batch-of-one",
            ERROR,
            "layer",
            "statistics collected one sample at a time",
            "statistics collected one sample at a time",
            "The running variance matches the spread within single samples, not across the data: what the "
            "layer accumulates when trained on batches of one. A batch of one has no spread across samples "
            "(where a feature has one value per sample its variance is 0 and the layer outputs beta whatever "
            "the input), so in eval mode the layer divides by a variance far smaller than its inputs have.",
            "Compare, per channel and in log space, the stored variance with the recomputed population "
            "variance and with the variance within single samples (over a sample's spatial positions; 0 where "
            "it has one value per feature). Only channels where these two hypotheses differ by more than a "
            "factor 2 can tell them apart. If at least half the channels can, and on the median of those "
            "channels the stored variance lies more than halfway (in log) from the population variance toward "
            "the one-sample variance, the layer was trained one sample at a time. The evidence gives both "
            "ratios.\n\n"
            "*What cannot be detected.* PyTorch refuses a literal batch of one where a feature has one value "
            "per sample, so in PyTorch this finding comes from a model trained elsewhere (TensorFlow returns "
            "beta), or from layers that see several values per sample. There it is visible only where samples "
            "differ from each other more than a sample's own values differ. On MNIST they do not: a conv layer "
            "trained on batches of one ends with nearly the population's statistics, and the check rightly "
            "says nothing about it. `num_batches_tracked` does not help: it counts batches, not samples.",
            "Train with batches of several samples (16 or more is safe); where only tiny batches fit, use "
            f"GroupNorm or LayerNorm instead of batch norm. To rescue this model, {_RECOMPUTE}.",
        ),
        Rule(
            "momentum-too-small",
            ERROR,
            "layer",
            "momentum so small that the statistics barely track the data",
            "statistics still remember their initial values",
            "With momentum m (1 - decay), after n training batches a share (1 - m)^n of the running "
            "statistics is still their initial value (mean 0, variance 1): decay 0.99 keeps 37% of it after "
            "100 batches, 8% after 250. For this layer that share alone puts the statistics off the data's "
            f"(median channel's mean off by more than {DRIFT_LIMIT} standard deviations, or its standard "
            f"deviation by more than a factor {math.exp(DRIFT_LIMIT):.2f}), and they are: in eval mode the layer "
            "normalizes with a blend of its inputs' statistics and 0 / 1.",
            "Per channel, `shift = |running_mean - mean| / sqrt(var + eps)` is the mean's error in standard "
            "deviations and `stretch = |log(running_var + eps) - log(var + eps)| / 2` the |log| of the ratio "
            "of standard deviations, against the statistics recomputed from the data. The layer has drifted "
            f"when, for its median channel, `max(shift, stretch) > {DRIFT_LIMIT}` (the median keeps a few dead "
            "or odd channels from deciding). It is this finding when, in addition, the statistics an exact "
            "exponential average from the initial values would hold now, `(1 - (1 - m)^n) * mean` and "
            "`(1 - m)^n + (1 - (1 - m)^n) * var`, fail the same limit: the initial values alone explain the "
            "drift. This needs `num_batches_tracked > 0` and a numeric momentum. A small momentum by itself is "
            "not flagged (decays of 0.999 or 0.9997, as in Inception, are fine when trained long enough), nor "
            "a small `num_batches_tracked` (after `torch.optim.swa_utils.update_bn` the counter is small but "
            "the statistics are exact). Recurrent `SequenceBatchNorm` tables are not compared layer by layer; "
            "`stale-stats` covers them.",
            "Train for more batches or raise momentum (PyTorch's default is 0.1; decay 0.99 is momentum 0.01), "
            f"or {_RECOMPUTE}.",
        ),
        Rule(
            "stale-stats",
            ERROR,
            "model",
            "the stored statistics cost accuracy",
            "held-out inputs score clearly worse with the stored statistics than with recomputed ones",
            "Scored on held-out inputs, the model does clearly worse with its stored population statistics "
            "than with statistics recomputed from other inputs with the same weights: the stored ones no longer "
            "describe what the layers see. Usual causes: statistics lagging the weights (the weights moved on "
            "after the statistics were collected, BN frozen in eval mode while fine-tuning, an average too "
            "slow for how fast the weights moved), or data preprocessed differently from the training data. "
            "The evidence names the layers whose statistics drifted most.",
            "The check data (MNIST's test split unless given) is shuffled once (seed 0) and split: the first "
            "`stats_samples` inputs (1,024) recompute every BN layer's statistics with `bnlab.recalibrate` "
            "(batches of 64, weights frozen), and the next `held_out` inputs (1,024) are scored twice in eval "
            "mode, whatever mode the model came in: with the stored statistics and with the recomputed ones. "
            "What is compared:\n\n"
            f"- with labels and a classifier (outputs (N, classes)): accuracy. Stale when it is lower with the "
            f"stored statistics by more than {ACCURACY_LOSS * 100:g} point, by more than {ERROR_SHARE:.0%} of the "
            f"errors made with the recomputed statistics, and by more than {NOISE_Z:g} paired "
            "standard errors, `sqrt(d + e - (d - e)^2 / n) / n`, where `d` and `e` count the inputs only one "
            "of the two gets right. The point is what matters: on the seed ConvNet (about 97%) it is a third "
            "of the errors, and recomputing is one command. The standard errors keep chance from deciding: a "
            "model with sound statistics fails by chance about once in 700 checks, while a loss of several "
            "points is many standard errors on 1,024 inputs.\n"
            f"- a classifier without labels: the share of predictions that change. Stale above "
            f"{CHANGED_LIMIT:.0%}: a loss of 1 point needs at least 1% of the predictions to change, and sound "
            "statistics estimated twice disagree on borderline inputs only, well under 1% on MNIST.\n"
            "- any other output: how far the outputs move, `||y_stored - y_recomputed|| / ||y_recomputed - "
            f"mean||` (the spread over the samples, so a constant offset counts against its size). Stale above "
            f"{OUTPUT_LIMIT:g}.\n\n"
            "A model whose stored statistics are better than the recomputed ones is not flagged. The evidence "
            "lists the three BN layers whose statistics are furthest from the recomputed ones (`max(shift, "
            "stretch)` of the median channel, see `momentum-too-small`). Recomputing from 1,024 inputs is itself "
            "noisy, which only makes the recomputed statistics look worse: the rule errs toward passing.",
            f"If inference data is preprocessed exactly as in training, the statistics lag the weights: {_RECOMPUTE}.",
        ),
        Rule(
            "momentum-too-large",
            WARNING,
            "layer",
            "momentum so large that the statistics follow only the last batches",
            "statistics follow only the last batch or two",
            "PyTorch's momentum is the weight of the newest batch (1 - decay in TensorFlow and Keras terms). At "
            f"{FAST_MOMENTUM} or more the running statistics average the last 2 / momentum - 1 <= 3 batches "
            "(momentum 1: the last batch alone), so they are as noisy as a single batch's. A Keras decay "
            "(0.99) passed as PyTorch's momentum does this.",
            f"`momentum >= {FAST_MOMENTUM}` on a layer that tracks statistics. It is a warning, because a model "
            "whose last batches happened to be representative still works (and `stale-stats` says when it "
            "does not).",
            "Use momentum=0.1 (PyTorch's default) or 0.01; for a decay d, pass momentum=1 - d.",
        ),
        Rule(
            "batch-dependent",
            ERROR,
            "model",
            "predictions change with the batch",
            "predictions change with the rest of the batch",
            "Scored alone and inside a batch, the same samples get different outputs: some layer normalizes "
            "with batch statistics at inference, so a prediction depends on the rest of its batch.",
            "The first `samples` inputs (100) are scored in one batch, then each alone, in the mode the model "
            "was handed over in. Alone means a batch of two copies of the sample: its batch statistics are then "
            "exactly the sample's own (as TensorFlow computes them for a batch of one), where PyTorch would "
            "refuse to normalize a single value. The finding is reported when the largest difference between "
            f"an output alone and the same output in the batch exceeds {TOLERANCE:g} of the largest output "
            f"({HALF_TOLERANCE:g} for float16 and bfloat16 models); reordering the same arithmetic moves float32 "
            "outputs by about 1e-6. NaN against NaN and equal infinities count as equal. For classifiers the "
            "evidence adds how many predicted classes change and, with labels, the accuracy both ways. Any "
            "layer that normalizes over the batch is caught this way, recognised as batch norm or not.",
            "Call model.eval(), and give every BN layer population statistics (see the layer findings).",
        ),
        Rule(
            "identical-when-alone",
            ERROR,
            "model",
            "every sample gets the same prediction when scored alone",
            "every sample scored alone gets the same prediction",
            "Scored one at a time every sample gets the same output, while inside a batch the outputs differ. "
            "A BN layer using batch statistics sees a single value per feature in a batch of one: its variance "
            "is 0, the layer outputs beta whatever the input, and everything after it is constant.",
            "The notebook's lesson. All outputs scored alone are equal (same tolerance as `batch-dependent`) "
            "and the batch outputs are not. This replaces `batch-dependent` when it applies.",
            "Call model.eval() so that batch norm uses its population statistics, and make sure they were "
            "tracked in training (track_running_stats=True).",
        ),
        Rule(
            "small-batch",
            WARNING,
            "layer",
            "batch statistics from a handful of samples",
            f"each training statistic came from fewer than {FEW_SAMPLES} samples",
            "In training this layer normalized with the statistics of very few samples. With n samples the batch "
            "mean is off by about 1 / sqrt(n) standard deviations and the variance by about sqrt(2 / (n - 1)) of "
            "itself (n = 4: half a standard deviation and 82%), so the network learns to expect that noise, and "
            "the population statistics it meets at inference are not what it trained with. Spatial positions "
            "add values but not independent ones: on ImageNet, ResNet-50's error with batch norm rises from "
            "23.6% at 32 images per GPU to 34.7% at 2 (Wu & He 2018), where GroupNorm stays at 24.1%.",
            "The samples each statistic was taken over in training: the training batch (for a bnlab run, its "
            "config's `batch_size`, which is the global batch when it trained on several processes, whose "
            "statistics are synchronized; for any other model, `train_batch_size=` or `--train-batch-size`: the "
            "per-process batch, times the processes if batch norm was synchronized), or a ghost batch norm's "
            f"`virtual_batch_size` if smaller. Reported when that is under {FEW_SAMPLES}. Without a training "
            "batch size only ghost layers can be judged. Batch renorm layers are not reported: renorm is one of "
            "the fixes.",
            "Take each statistic over more samples: synchronize batch norm across processes (bnlab.convert(model, "
            "'sync') with a process group), or use batch renorm (convert(model, 'renorm')) or GroupNorm "
            "(convert(model, 'group')), which has no batch dimension at all; to fine-tune a pretrained model on "
            "small batches, freeze its statistics (convert(model, 'frozen')). Ghost batch norm is the opposite "
            "tool: it takes statistics over fewer samples inside a large batch. docs/family.md describes each.",
        ),
        Rule(
            "redundant-bias",
            WARNING,
            "layer",
            "bias before batch norm is redundant",
            "the layer feeding BN has a bias BN removes again",
            "The layer feeding this BN adds a bias per channel, which BN's mean subtraction removes again, in "
            "training and in eval: wasted parameters that learn nothing. BN's beta already is the bias.",
            "During the traced forward pass (the batch scored for `batch-dependent`), the tensor BN reads was "
            "last produced by a `Conv*d` / `ConvTranspose*d` whose `out_channels` equals BN's features, or by "
            "an `nn.Linear` with 2-D output, and that layer has `bias=True`. An activation in between, even "
            "`ReLU(inplace=True)`, which returns the very same tensor, means the bias is not redundant, and "
            "the check says nothing. Only modules are traced: a bias added with a functional call inside "
            "`forward` is not seen.",
            "Build the layer that feeds batch norm with bias=False.",
        ),
        Rule(
            "bn-on-logits",
            WARNING,
            "layer",
            "batch norm on the model's output",
            "the model's output comes straight out of BN",
            "The model's output comes straight from this BN layer (through parameter-free layers at most), so "
            "every class score is normalized across the batch: each class gets the same mean and spread of "
            "scores over a batch, and in training each prediction depends on the rest of the batch.",
            "Walking back from the output tensor through the traced producers, past modules without "
            "parameters (softmax, dropout, flatten, pooling), reaches a BN layer. It is a warning: a model "
            "whose normalized outputs are intended (an embedding, a self-supervised projector) is fine.",
            "End a classifier with a plain linear layer: remove the BN after it (keep BN on hidden layers). "
            "Ignore this for a model whose normalized outputs are intended, such as an embedding.",
        ),
        Rule(
            "foldable",
            INFO,
            "model",
            "batch norm can be folded away for deployment",
            "eval-mode BN layers that fold into the convolution or linear layer before them",
            "In eval mode each of these BN layers is a fixed affine map per channel applied to the output of a "
            "convolution or linear layer, which can absorb it: the folded model computes the same outputs, to "
            "float rounding, with fewer layers, which is faster at small batches. Nothing is wrong; keep the "
            "unfolded model for training.",
            "The model is in eval mode and `bnlab.fold`, traced on the batch scored for `batch-dependent`, folds "
            "at least one BN layer: one that reads the output of a `Conv*d`, `ConvTranspose*d` or `Linear` that "
            "nothing else reads (docs/fold.md gives every condition). The evidence counts the layers that fold and "
            "those that do not.",
            "`bnlab fold RUN_DIR` writes a folded checkpoint and a torch.export program beside it; for any model, "
            "bnlab.fold(model, example_input).model is the folded copy.",
        ),
    )
}
