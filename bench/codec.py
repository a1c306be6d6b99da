"""Shorthand for ``python -m bench.run --only codec``; takes bench.run's other options.

python -m bench.codec [--quick] [--results-dir DIR] ...
"""

from bench.run import only

if __name__ == "__main__":
    only("codec")
