"""Reading a run's files for comparisons between runs: everything but wall-clock timings must match."""
import json


def jsonl_without_timings(path) -> list:
    """The records of a ``.jsonl`` file without their ``seconds_*`` fields (wall clock, different on every run)."""
    with open(path) as handle:
        return [{key: value for key, value in json.loads(line).items() if not key.startswith("seconds_")}
                for line in handle]
