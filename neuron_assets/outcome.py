"""What a set of runs left behind: per asset, its rows that are errors (a failed unit is a row with
an `error`, never a failed run) and the partitions where every unit failed, which `demo` and
`refresh` report and turn into a non-zero exit status."""

from dataclasses import dataclass, field

from neuron_assets.resources.storage import TableStorage

FIRST_MESSAGES = 3  # distinct error messages shown per asset


@dataclass
class ErrorRows:
    asset: str
    rows: int = 0
    errors: int = 0
    messages: list[str] = field(default_factory=list)  # the first distinct ones
    all_failed: list[str] = field(default_factory=list)  # partitions where every row is an error


def error_rows(storage: TableStorage, runs) -> list[ErrorRows]:
    """The error rows of the tables that `runs` ((selection, partition) pairs) wrote, per asset with
    an `error` column, in the order the runs name them. Range runs and partitions without a table
    are skipped."""
    found: dict[str, ErrorRows] = {}
    for selection, partition in runs:
        if not isinstance(partition, str):
            continue
        for asset in selection:
            if not storage.exists(asset, partition):
                continue
            table = storage.read(asset, partition)
            if "error" not in table.columns:
                continue
            errors = table["error"].drop_nulls()
            entry = found.setdefault(asset, ErrorRows(asset))
            entry.rows += table.height
            entry.errors += errors.len()
            for message in errors.unique(maintain_order=True).to_list():
                if message not in entry.messages and len(entry.messages) < FIRST_MESSAGES:
                    entry.messages.append(message)
            if table.height and errors.len() == table.height:
                entry.all_failed.append(partition)
    return list(found.values())


def describe(entries: list[ErrorRows]) -> list[str]:
    """Lines for the console: per asset with errors, how many rows and its first messages; then
    the partitions where every unit failed."""
    lines = []
    for e in entries:
        if e.errors:
            lines.append(f"{e.asset}: {e.errors} of {e.rows} rows are errors")
            lines += [f"    {message}" for message in e.messages]
    failed = [f"{e.asset}[{p}]" for e in entries for p in e.all_failed]
    if failed:
        lines.append(f"every unit failed in {len(failed)} partition(s): {', '.join(failed)}")
    return lines
