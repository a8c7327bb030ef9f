"""The MODEL of ``bnlab check``: a bnlab checkpoint or run directory, or ``module:factory``, any Python function.

Importing the module and calling the factory runs the user's code: whatever it raises, ``SystemExit``
and ``KeyboardInterrupt`` included, becomes a one-line error naming what failed, never a verdict
(a module that calls ``sys.exit(0)`` at import must not look like a model that passed).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnlab.check.probes import one_line
from bnlab.errors import BnlabError, Interrupted, UsageError

__all__ = ["load_check_target", "load_model_spec", "require_values"]

_NAME = re.compile(r"^[A-Za-z_][\w.]*$")


def load_model_spec(spec: str, device: str | torch.device = "cpu") -> nn.Module:
    """The model ``bnlab check`` takes: a bnlab checkpoint or run directory, or ``module:factory``.

    A checkpoint gives the seed ConvNet in eval mode; ``module:factory`` imports ``module`` (it must
    be importable) and calls ``factory()`` with no arguments; the model keeps the mode it returns in.
    """
    return load_check_target(spec, device)[0]


def load_check_target(spec: str, device: str | torch.device = "cpu") -> tuple[nn.Module, int | None]:
    """``load_model_spec``'s model, and the batch it trained with where the spec says: a bnlab checkpoint's
    config's ``batch_size`` (the global batch, whose statistics bnlab synchronizes across processes); None for
    ``module:factory``."""
    from bnlab.training import load_model, resolve_device

    device = device if isinstance(device, torch.device) else resolve_device(device)
    if Path(spec).exists():
        checkpoint = load_model(spec, device)
        return checkpoint.model, checkpoint.config.batch_size
    module_name, colon, factory_name = spec.partition(":")
    if not colon:
        raise UsageError(
            f"{spec!r} is neither a checkpoint nor a run directory that exists, nor module:factory "
            "(a Python function that returns the model, e.g. mymodels:build)"
        )
    if not (_NAME.match(module_name) and _NAME.match(factory_name)):
        raise UsageError(f"{spec!r} is not module:factory; write it like mypackage.models:build_model")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not (module_name + ".").startswith(err.name + "."):
            raise BnlabError(f"importing {module_name} failed: {one_line(err)}") from err
        raise UsageError(
            f"cannot import {module_name} (no module named {err.name!r}); run bnlab from the folder that holds it, "
            "or add that folder to PYTHONPATH"
        ) from None
    except Interrupted:  # a real Ctrl-C or SIGTERM while importing: the command ends (status 130)
        raise
    except (SystemExit, KeyboardInterrupt) as err:
        raise BnlabError(
            f"importing {module_name} stopped: it raised {_stopped(err)}; keep a module's script code under "
            "if __name__ == '__main__': so that importing it only defines the model"
        ) from err
    except Exception as err:  # the module's own code failed
        raise BnlabError(f"importing {module_name} failed: {one_line(err)}") from err
    factory: Any = module
    for part in factory_name.split("."):
        if not hasattr(factory, part):
            raise UsageError(f"{module_name} has no {factory_name!r}; check the name after the colon in {spec!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise UsageError(f"{spec} is not a function that returns a model but a value of type {type(factory).__name__}")
    try:
        model = factory()
    except Interrupted:
        raise
    except (SystemExit, KeyboardInterrupt) as err:
        raise BnlabError(f"{spec}() stopped: it raised {_stopped(err)}; a factory must return the model") from err
    except Exception as err:  # the factory's own code failed
        raise BnlabError(f"{spec}() failed: {one_line(err)}") from err
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec}() returned a value of type {type(model).__name__}, not a torch.nn.Module")
    require_values(model, f"{spec}()'s model")
    return model.to(device), None


def require_values(model: nn.Module, what: str = "the model") -> None:
    """Refuse a model whose tensors hold no values (the meta device: shapes only), naming the first."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise UsageError(
                f"{what} has its weights on the meta device ({name} holds a shape but no values), so it cannot "
                "run; materialize it first (model.to_empty(device='cpu'), then load or initialise its weights)"
            )


def _stopped(err: SystemExit | KeyboardInterrupt) -> str:
    """``SystemExit(0)`` (what sys.exit(0) raises) or ``KeyboardInterrupt``, as one line."""
    if isinstance(err, SystemExit):
        return f"SystemExit({' '.join(repr(err.code).split())})"
    return "KeyboardInterrupt"
