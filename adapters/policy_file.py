"""Reading policy files (TOML) into the validated domain model."""

import tomllib
from importlib import resources
from pathlib import Path

from pydantic import ValidationError

from domain.policy import Policy


class PolicyFileError(ValueError):
    """A policy file that cannot be used, with a message that says why."""


def load_policy(path: Path | None = None) -> Policy:
    """Loads and validates a policy; `None` means the shipped default."""
    try:
        if path is None:
            text = resources.files("adapters.policies").joinpath("default.toml").read_text()
        else:
            text = path.read_text()
        return Policy.model_validate(tomllib.loads(text))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PolicyFileError(f"{path or 'default policy'}: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise PolicyFileError(f"{path or 'default policy'}: {problems}") from exc
