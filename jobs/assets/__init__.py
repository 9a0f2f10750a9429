"""Data shipped inside the package: character cards, prompt sets, profiles."""

from importlib import resources

from jobs.errors import InputError


def builtin(source: str, kind: str, suffix: str) -> bytes:
    """The bytes of `builtin:<name>` from `jobs/assets/<kind>/<name><suffix>`."""
    name = source.removeprefix("builtin:")
    path = resources.files(f"jobs.assets.{kind}").joinpath(f"{name}{suffix}")
    if not path.is_file():
        raise InputError(f"{source}: no built-in {kind[:-1]} named {name!r}")
    return path.read_bytes()
