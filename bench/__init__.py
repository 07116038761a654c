"""Switchboard's benchmarks (`make bench`, `python -m bench`): every figure
measured against the real suite and beside its baseline, in the same run."""
