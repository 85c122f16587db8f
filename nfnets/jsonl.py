"""Reading metrics.jsonl, the runner's log: one JSON object per line.

The runner appends a line per event. A job killed in the middle of a write
(SIGKILL, a host lost) leaves its last line cut short, so every reader skips
a line that is not a JSON object instead of failing on it: the runner when
it resumes, `nfnets.sweep`'s summaries and `nfnets.reproduce`'s curves.
"""

import json
from typing import Any


def parse(text: str) -> tuple[list[dict[str, Any]], int]:
  """The JSON objects of `text`'s lines, and how many other lines it has.

  Args:
    text: a metrics.jsonl file's contents.

  Returns:
    `(records, skipped)`: each non-blank line that is a JSON object, in
    order, and the number of non-blank lines that are not.
  """
  records, skipped = [], 0
  for line in text.splitlines():
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:
      record = None
    if isinstance(record, dict):
      records.append(record)
    else:
      skipped += 1
  return records, skipped
