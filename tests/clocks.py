"""A stand-in for the budget's clock, so that the tests' plans do not depend on the machine."""


class Clock:
    """A stand-in for ``time.perf_counter`` that moves only when told (``clock.now += s``)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now
