"""Shorthand for ``python -m bench.run --only scale``; takes bench.run's other options.

python -m bench.scale [--quick] [--results-dir DIR] ...
"""

from bench.run import only

if __name__ == "__main__":
    only("scale")
