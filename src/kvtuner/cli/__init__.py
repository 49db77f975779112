"""The ``kvtuner`` command line (filled in below)."""


def main() -> None:
    pass
