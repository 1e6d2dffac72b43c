"""The Dagster instance of the CLI: $DAGSTER_HOME (default .dagster_home), SQLite unless its
dagster.yaml says otherwise (resources/dagster_postgres.yaml), with errors that name what to fix."""

import os
from pathlib import Path

PG_SETTINGS = ("NEURON_ASSETS_PG_HOST", "NEURON_ASSETS_PG_PORT", "NEURON_ASSETS_PG_USER",
               "NEURON_ASSETS_PG_PASSWORD", "NEURON_ASSETS_PG_DB")


class InstanceError(RuntimeError):
    """The Dagster instance cannot be opened, with what to change."""


def dagster_home(create: bool = True) -> Path:
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".dagster_home").resolve())))
    config = home / "dagster.yaml"
    if create and not config.exists():
        home.mkdir(parents=True, exist_ok=True)
        config.write_text((Path(__file__).resolve().parents[1] / "resources" / "dagster.yaml").read_text())
    return home


def open_instance(create: bool = True):
    from dagster import DagsterInstance, DagsterInvalidConfigError

    config = dagster_home(create) / "dagster.yaml"
    try:
        return DagsterInstance.get()
    except DagsterInvalidConfigError as e:
        raise InstanceError(f"the Dagster instance config {config} is invalid: {e}") from e
    except Exception as e:
        if not type(e).__module__.startswith(("dagster_postgres", "psycopg", "sqlalchemy")):
            raise
        where = ", ".join(f"{name}={os.environ.get(name, '(unset)')}" for name in PG_SETTINGS[:2])
        raise InstanceError(
            f"cannot connect to the PostgreSQL database of the Dagster instance ({config}) at {where}: "
            f"{_last_line(e)}. Start PostgreSQL there, or fix {', '.join(PG_SETTINGS)}."
        ) from e


def _last_line(error: Exception) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
