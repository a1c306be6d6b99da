"""Shorthand for ``python -m bench.run --only autograd``; takes bench.run's other options.

python -m bench.autograd_step [--quick] [--results-dir DIR] ...
"""

from bench.run import only

if __name__ == "__main__":
    only("autograd")
