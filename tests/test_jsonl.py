"""metrics.jsonl reading (`nfnets.jsonl`)."""

from nfnets import jsonl


def test_parse_keeps_objects_and_counts_other_lines():
  text = '{"step": 1}\n\n[1, 2]\n{"step": 2, "loss": 0.5}\nnot json\n{"st'
  records, skipped = jsonl.parse(text)
  assert records == [{'step': 1}, {'step': 2, 'loss': 0.5}]
  assert skipped == 3  # a list, a word and a line cut short; blanks are not
  assert jsonl.parse('') == ([], 0)
