"""Training options, written once.

``TrainConfig`` is three things at the same time: the options of a run, the ``train`` command's
command-line options (each field's metadata holds its help text and flags, and the command is
generated from the fields) and the ``train`` section of a run's ``config.json``. A field added
here is therefore an option, is recorded, and is read back by ``--config``.

Importable without torch, so that building the command line stays cheap.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["TrainConfig", "ConfigFileError", "FORMAT_VERSION", "RUN_CONFIG_SECTIONS", "SMOOTHING_OBJECTIVES",
           "DEFAULT_NOISE_COPIES", "ATTACKING_OBJECTIVES", "CONSISTENCY_OBJECTIVES", "option", "command_line_fields",
           "read_options_file", "differing_options"]

FORMAT_VERSION = 1

# Training objectives for randomized smoothing (see training/smoothing_objectives.py) and the
# number of noisy copies per image each paper trains with. smoothadv-consistency is Jeong & Shin's
# combination (their best MNIST figures): SmoothAdv's attack, then consistency on the attacked copies.
SMOOTHING_OBJECTIVES = ("gaussian", "consistency", "smoothadv", "smoothadv-consistency")
DEFAULT_NOISE_COPIES = {"gaussian": 1, "consistency": 2, "smoothadv": 4, "smoothadv-consistency": 4}
ATTACKING_OBJECTIVES = ("smoothadv", "smoothadv-consistency")  # train on SmoothAdv's attacked images
CONSISTENCY_OBJECTIVES = ("consistency", "smoothadv-consistency")  # add the consistency regularizer
MAX_NOISE_COPIES = 64  # a typo guard: every copy is a forward pass of the whole batch

# The sections `train` writes into config.json. Only `train` holds options; the others are
# derived from them (model, data) or describe the machine that ran it (versions, world size),
# so `--config` accepts and ignores them: they cannot change what the options train.
RUN_CONFIG_SECTIONS = ("format_version", "package_version", "train", "model", "data", "distributed")


class ConfigFileError(ValueError):
    """A ``--config`` file that cannot be read as training options; the message names the key."""


def option(default: Any, help: str, *flags: str, **click: Any) -> Any:
    """A ``TrainConfig`` field that is also a ``train`` option: ``flags`` default to ``--field-name``
    and ``click`` holds further ``typer.Option`` arguments (``min=1``, ``metavar=...``)."""
    return field(default=default, metadata={"help": help, "flags": flags, "click": click})


@dataclass
class TrainConfig:
    """All options of a training run; stored in config.json so the run can be repeated."""

    model: str = option("specformer-tiny", "Preset (specformer-tiny, specformer-mnist, specformer-mnist-convstem, "
                        "paper-vit-s, deit_tiny_patch16_224, convit_tiny) or any timm ViT-family model name.")
    dataset: str = option("digits", "digits or mnist (built in), cifar10, cifar100 or imagefolder.")
    data_dir: str | None = option(None, "The directory that holds cifar-10-batches-py / cifar-100-python (or that "
                                  "directory itself), or that holds train/ and val/ for imagefolder.", metavar="DIR")
    img_size: int | None = option(None, "Image size passed to timm (default: the model's).")
    patch_size: int | None = option(None, "Patch size passed to timm (default: the model's).")
    in_chans: int | None = option(None, "Input channels of the model: 1 (grey) or 3 (colour). Default: the data's "
                                  "own (1 for digits, mnist and a grey image folder); other data is converted (grey "
                                  "replicated, colour to ITU-R 601 luma).", metavar="C")
    val_images: int = option(0, "Hold out this many training images as a validation split (stratified by class, "
                                "the same images for every run and seed): never trained on, val_accuracy reported "
                                "each epoch, and `evaluate --smoothing --split val` certifies them. Choose settings on "
                                "it and report on the test images. 0: no split.", min=0)
    train_images: int = option(0, "Train on a stratified subset of this many training images (the same subset for "
                                  "every run and seed; taken after --val-images, which it never touches), for a "
                                  "data-size study. 0: all of them.", min=0)
    epochs: int = option(50, "Training epochs (the default suits the built-in digits).", min=1)
    batch_size: int = option(32, "Global batch size: under torchrun each of the N processes takes batch-size/N "
                             "images per step.", min=2)
    optimizer: str = option("sgd", "sgd (momentum, the paper's) or adamw (most ViT-from-scratch recipes: use about "
                                   "--lr 1e-3 --weight-decay 0.05).")
    translate: int = option(0, "Shift each training image by up to N whole pixels per axis (zeros fill in), before "
                               "any noise; for digits a few pixels. 0: off.", min=0)
    rotate: float = option(0.0, "Rotate each training image by up to DEG degrees, before any noise. No flips are "
                                "offered: a mirrored digit is another symbol. 0: off.")
    ema_decay: float = option(0.0, "Keep an exponential moving average of the weights (timm's ModelEmaV3, with "
                                   "warm-up) at this decay, e.g. 0.999: it is what each epoch evaluates (the raw "
                                   "weights' accuracy is logged beside it) and what the run saves and exports. 0: off.")
    lr: float = option(0.1, "Peak learning rate (warm-up then cosine).")
    weight_decay: float = option(1e-4, "SGD weight decay.")
    momentum: float = option(0.9, "SGD momentum.")
    warmup_epochs: int = option(2, "Linear warm-up epochs.", min=0)
    min_lr: float = option(1e-5, "Learning rate at the end of the cosine schedule.")
    mixup: bool | None = option(None, "CutMix + Mixup (timm). Default: on for standard, off for adversarial "
                                "training (PGD-AT, smoothadv).",
                                "--mixup/--no-mixup")
    mixup_alpha: float = option(0.2, "Mixup alpha (0 disables; the DeiT/paper recipe uses 0.8).")
    cutmix_alpha: float = option(0.2, "CutMix alpha (0 disables; the DeiT/paper recipe uses 1.0).")
    label_smoothing: float = option(0.1, "Label smoothing (standard training).")
    msvp: bool = option(True, "Penalize every head's largest singular value.", "--msvp/--no-msvp")
    lambda_q: float = option(1e-4, "MSVP weight for W_Q (paper range 1e-6..1e-3).")
    lambda_k: float = option(1e-4, "MSVP weight for W_K.")
    lambda_v: float = option(1e-4, "MSVP weight for W_V.")
    n_power_iterations: int = option(1, "Power iterations per training step.", min=1)
    adversarial: bool = option(False, "PGD adversarial training (Madry).", "--adversarial")
    adv_eps: float = option(8 / 255, "PGD-AT radius (Linf, pixel space).")
    adv_step: float = option(2 / 255, "PGD-AT step size.")
    adv_steps: int = option(10, "PGD-AT steps.", min=1)
    noise_sd: float = option(0.0, "Gaussian noise augmentation for randomized smoothing (Cohen et al.): every "
                             "training image gets x + N(0, SIGMA^2 I) in pixel space [0, 1], unclipped; 0 = off. "
                             "Certify with the same sigma.", metavar="SIGMA")
    smoothing_objective: str = option(
        "gaussian", "What training with --noise-sd minimizes: gaussian (Cohen et al. 2019: cross-entropy of noisy "
        "images), consistency (Jeong & Shin 2020: cross-entropy of m noisy copies + LAMBDA * mean KL(mean "
        "prediction || each copy's) + ETA * entropy of the mean prediction) or smoothadv (Salman et al. 2019: L2 PGD "
        "against the smoothed soft classifier over m fixed noise draws, then cross-entropy of the m noisy copies of "
        "the attacked image) or smoothadv-consistency (Jeong & Shin's best MNIST combination: SmoothAdv's attack, "
        "then consistency on the attacked copies; they use --consistency-lambda 1 with it). Every objective but "
        "gaussian needs --noise-sd > 0.", metavar="OBJECTIVE")
    noise_copies: int | None = option(
        None, "Noisy copies m of every image per step, one forward pass of m x the batch (cost grows with m). "
        "Default: the paper's, 1 for gaussian, 2 for consistency (Jeong & Shin), 4 for smoothadv (Jeong & Shin's "
        "MNIST SmoothAdv runs; Salman et al. use 1-8), 4 for smoothadv-consistency. The consistency objectives "
        "need m >= 2.", metavar="M", min=1)
    consistency_lambda: float = option(20.0, "Consistency: weight LAMBDA of the KL term (Jeong & Shin: 20 on MNIST, "
                                       "10 on CIFAR-10; 1 with smoothadv-consistency on MNIST).", metavar="LAMBDA")
    consistency_eta: float = option(0.5, "Consistency: weight ETA of the entropy of the mean prediction (Jeong & "
                                    "Shin: 0.5).", metavar="ETA")
    smoothadv_eps: float = option(255 / 256, "SmoothAdv: L2 radius of the attack in pixels [0, 1] (Jeong & Shin's "
                                  "MNIST runs: 255/256; Salman et al. on CIFAR-10: 0.25, 0.5 or 1).", metavar="EPS")
    smoothadv_steps: int = option(10, "SmoothAdv: PGD steps, each 2 * EPS / STEPS long (Salman et al.'s rule; "
                                  "default 10 as theirs).", min=1)
    smoothadv_warmup_epochs: int = option(10, "SmoothAdv: the radius grows linearly over these epochs, epoch e "
                                          "(from 0) attacking at min(EPS, (e + 1) * EPS / N) (Salman et al.; 10 as "
                                          "Jeong & Shin's MNIST runs); 0 = full radius from the start.",
                                          metavar="N", min=0)
    seed: int = option(0, "Seed for initialization, data order and augmentation.")
    device: str = option("auto", "auto, cpu or cuda (under torchrun each process takes GPU LOCAL_RANK).")
    pretrained: str | None = option(None, "Local weights to start from: a timm checkpoint (timm train.py's "
                                    ".pth.tar), .safetensors or a state dict.", metavar="FILE")
    mlp_act: str = option("gelu", "MLP activation: gelu (timm's), relu or clipped-relu (learned threshold per unit); "
                          "ReLU-family MLPs get local MLP bounds in certificates.")
    sparsity_weight: float = option(0.0, "Weight of the activation sparsity loss (relu/clipped-relu).")
    attention: str = option("dot", "dot (timm's softmax attention), or a paper baseline: l2 (Kim et al. 2021), "
                            "lipnorm (LipschitzNorm), scsa (LipsFormer).")
    compile: bool = option(False, "torch.compile the model (first steps are slow while it compiles; needs a C++ "
                           "compiler on CPU).", "--compile")
    # Free-form notes a library caller attaches to a run; recorded, not a command-line option.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def hard_labels(self) -> bool:
        """Adversarial training (PGD-AT, SmoothAdv) attacks and trains on hard labels, as Madry et al.
        and Salman et al.: Mixup is off by default and label smoothing does not apply."""
        return self.adversarial or self.smoothing_objective in ATTACKING_OBJECTIVES

    @property
    def use_mixup(self) -> bool:
        enabled = (not self.hard_labels) if self.mixup is None else self.mixup
        return enabled and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    @property
    def copies(self) -> int:
        """Noisy copies per image and step: ``--noise-copies``, else the objective's paper default."""
        if self.noise_copies is not None:
            return self.noise_copies
        return DEFAULT_NOISE_COPIES.get(self.smoothing_objective, 1)

    @property
    def msvp_config(self):  # -> MSVPConfig (torch is imported only when a run needs it)
        from specformer_deploy.training.msvp import MSVPConfig

        return MSVPConfig(self.lambda_q, self.lambda_k, self.lambda_v, self.n_power_iterations)

    def validate(self) -> None:
        from specformer_deploy.attacks import check_budget

        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2 or (self.use_mixup and self.batch_size % 2):
            raise ValueError(f"--batch-size must be >= 2 (and even with mixup), got {self.batch_size}")
        if self.in_chans not in (None, 1, 3):
            raise ValueError(f"--in-chans must be 1 (grey) or 3 (colour), got {self.in_chans}")
        if not (self.lr > 0):
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"--optimizer must be sgd or adamw, got {self.optimizer!r}")
        if not (0 <= self.ema_decay < 1):
            raise ValueError(f"--ema-decay must be in [0, 1) (0: off; e.g. 0.999), got {self.ema_decay}")
        if not (0 <= self.rotate <= 45):
            raise ValueError(f"--rotate must be between 0 and 45 degrees, got {self.rotate}")
        if self.adversarial:
            check_budget(self.adv_eps, self.adv_step, self.adv_steps)
        self.msvp_config  # noqa: B018 - MSVPConfig checks the lambdas and iteration count
        if not (self.noise_sd >= 0) or self.noise_sd == float("inf"):
            raise ValueError(f"--noise-sd must be a finite number >= 0 (0 = off), got {self.noise_sd}")
        self._validate_smoothing_objective()
        if not (self.sparsity_weight >= 0):
            raise ValueError(f"--sparsity-weight must be >= 0, got {self.sparsity_weight}")
        if self.sparsity_weight > 0 and self.mlp_act == "gelu":
            raise ValueError("--sparsity-weight needs --mlp-act relu or clipped-relu (units that can be constant)")

    def _validate_smoothing_objective(self) -> None:
        objective = self.smoothing_objective
        if objective not in SMOOTHING_OBJECTIVES:
            raise ValueError(f"--smoothing-objective must be one of {', '.join(SMOOTHING_OBJECTIVES)}, "
                             f"got {objective!r}")
        if objective != "gaussian" and not self.noise_sd > 0:
            raise ValueError(f"--smoothing-objective {objective} trains for randomized smoothing and needs "
                             f"--noise-sd SIGMA > 0 (the sigma you will certify with)")
        if objective in ATTACKING_OBJECTIVES and self.adversarial:
            raise ValueError(f"--smoothing-objective {objective} is adversarial training already (L2 PGD against the "
                             "smoothed classifier); drop --adversarial (Linf PGD-AT on the base model)")
        if self.noise_copies is not None:
            if isinstance(self.noise_copies, bool) or not isinstance(self.noise_copies, int) or not (
                    1 <= self.noise_copies <= MAX_NOISE_COPIES):
                raise ValueError(f"--noise-copies must be an integer from 1 to {MAX_NOISE_COPIES}, "
                                 f"got {self.noise_copies!r}")
            if self.noise_copies > 1 and not self.noise_sd > 0:
                raise ValueError(f"--noise-copies {self.noise_copies} makes noisy copies and needs --noise-sd > 0")
        if objective in CONSISTENCY_OBJECTIVES and self.copies < 2:
            raise ValueError(f"--smoothing-objective {objective} compares noisy copies and needs --noise-copies >= 2, "
                             f"got {self.copies}")
        for flag, value in (("--consistency-lambda", self.consistency_lambda),
                            ("--consistency-eta", self.consistency_eta)):
            if not (0 <= value < float("inf")):
                raise ValueError(f"{flag} must be a finite number >= 0, got {value}")
        if not (0 < self.smoothadv_eps < float("inf")):
            raise ValueError(f"--smoothadv-eps must be a finite L2 radius > 0 in pixels [0, 1], "
                             f"got {self.smoothadv_eps}")
        if self.smoothadv_steps < 1:
            raise ValueError(f"--smoothadv-steps must be >= 1, got {self.smoothadv_steps}")
        if self.smoothadv_warmup_epochs < 0:
            raise ValueError(f"--smoothadv-warmup-epochs must be >= 0, got {self.smoothadv_warmup_epochs}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def command_line_fields() -> list[tuple[Field, Any]]:
    """The fields that are ``train`` options, each with its resolved type annotation."""
    types = _field_types()
    return [(f, types[f.name]) for f in fields(TrainConfig) if "help" in f.metadata]


def _accepts(value: Any, annotation: Any) -> bool:
    """Whether a value read from a file fits a field's type (an int is a float; bool is not an int)."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = typing.get_args(annotation) if union else (annotation,)
    if value is None:
        return type(None) in kinds
    for kind in kinds:
        origin = typing.get_origin(kind) or kind
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if origin in (str, bool, dict) and isinstance(value, origin):
            return True
    return False


def _yaml_loader() -> type:
    """PyYAML's safe loader with YAML 1.2 / JSON exponent floats: PyYAML (YAML 1.1) reads
    ``1e-05``, as ``json.dumps`` writes it, as a string."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    exponent_float = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", exponent_float, list("-+0123456789"))
    return Loader


def differing_options(recorded: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """The options a run was trained with (its config.json's ``train`` section) that differ from
    ``cfg``, device aside: what a tool must not reuse a finished run for. Fields the run predates
    take their defaults, which is what that run was trained with."""
    known = {f.name for f in fields(TrainConfig)}
    stored = asdict(TrainConfig(**{k: v for k, v in recorded.items() if k in known}))
    wanted = asdict(cfg)
    return [f"{k}: {stored[k]!r} there, {wanted[k]!r} asked" for k in wanted
            if k != "device" and stored[k] != wanted[k]]


def read_options_file(path: str | Path) -> dict[str, Any]:
    """Training options from a YAML file (JSON is YAML too).

    The file is either a mapping of option names (``batch_size`` or ``batch-size``) to values,
    or a run's ``config.json``, whose ``train`` section holds them: that repeats the run. Unknown
    keys and values of the wrong type are errors that name the key.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_yaml_loader())  # a SafeLoader
    except FileNotFoundError:
        raise ConfigFileError(f"--config {path} does not exist") from None
    except (OSError, yaml.YAMLError) as err:
        raise ConfigFileError(f"--config {path} is not readable YAML/JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConfigFileError(f"--config {path} must hold a mapping of option names to values, got "
                              f"{type(data).__name__}")
    if isinstance(data.get("train"), dict):
        unknown = sorted(set(data) - set(RUN_CONFIG_SECTIONS))
        if unknown:
            raise ConfigFileError(f"--config {path} looks like a run's config.json but has unknown section(s) "
                                  f"{', '.join(unknown)}; expected {', '.join(RUN_CONFIG_SECTIONS)}")
        version = data.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ConfigFileError(f"--config {path} has format_version {version!r}; this version of specformer-deploy "
                                  f"reads run configs up to format_version {FORMAT_VERSION}")
        data = data["train"]
    options = {str(key).replace("-", "_"): value for key, value in data.items()}
    types = _field_types()
    unknown = sorted(set(options) - set(types))
    if unknown:
        raise ConfigFileError(f"--config {path}: unknown option(s) {', '.join(unknown)}; known options are "
                              f"{', '.join(types)}")
    for name, value in options.items():
        if not _accepts(value, types[name]):
            raise ConfigFileError(f"--config {path}: {name} must be of type {types[name]}, got {value!r}")
    return options
