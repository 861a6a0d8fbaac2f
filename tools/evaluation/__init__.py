"""The accuracy harness behind tools/eval.py: readers, scoring, runner, table, answerer."""
