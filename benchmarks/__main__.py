"""``python -m benchmarks [--quick] [--only NAME ...]``."""

from benchmarks._runner import main

if __name__ == "__main__":
    main()
