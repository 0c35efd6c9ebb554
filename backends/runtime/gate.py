"""When to draft: a verify step of k + 1 tokens costs more than a one-token step (`ratio` of their times), so
drafting pays only while the tokens accepted per verify exceed that ratio. The gate starts from the ratio the
pass measured on this machine, then follows the times and acceptance it observes in this call; where drafting
stops paying (open-ended text, a batch whose rows rarely all agree) it turns drafting off and re-tries one
draft after `probe` steps, so a later stretch that copies its input turns it back on. Each probe that does not
pay doubles the wait for the next (up to `max_probe` steps): a verify step can cost 2x a plain one, and a probe
every 8 steps of text that never repeats would cost ~10%. With `start_off` (the starting ratio says even full
acceptance cannot pay: a batch size whose verify step measured too costly before) the first drafts are not tried
and the gate starts at its longest probe interval: a probe there can only re-measure the cost (every draft it
could accept still loses), and one every 8 steps cost ~4% at batch 4 on open-ended text. Steps whose graph
compiles on that call are not timed (the engine's `step_was_new`), so a start-off figure is a measured one.
The wait carries over between calls (`waited`): 128-token calls would otherwise never reach a probe, and a
figure that noise pushed past k + 1 would keep that batch size from drafting for good."""

from __future__ import annotations


class DraftGate:
    def __init__(self, ratio: float, probe: int = 8, decay: float = 0.8, max_probe: int = 128,
                 start_off: bool = False, waited: int = 0, always: bool = False) -> None:
        self.ratio, self.probe, self.decay, self.max_probe = ratio, probe, decay, max_probe
        self.always = always  # draft at every step whatever it measures (to measure a drafter's acceptance)
        self.interval = max_probe if start_off else probe  # steps until the next probe
        self.plain_s: float | None = None
        self.verify_s: float | None = None
        self.first_tries = 0 if start_off else 2
        # optimistic until measured (the first drafts are tried), or the model's own token only when starting off
        self.tokens = 1.0 if start_off else 1.0 + ratio
        self.verifies = 0
        self.since_probe = waited  # plain steps earlier calls at this batch already waited (engine-kept)

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1 - self.decay) * new

    def want(self) -> bool:
        if self.always or self.verifies < self.first_tries or self.tokens >= self.cost():
            self.interval = self.probe  # paying: probes return to their base rate once it stops
            return True
        self.since_probe += 1
        if self.since_probe >= self.interval:
            self.since_probe = 0
            self.interval = min(2 * self.interval, self.max_probe)
            return True
        return False

    def measured(self) -> bool:
        """Whether both a plain and a verify step were timed (so `cost` is this call's, not the estimate)."""
        return self.plain_s is not None and self.verify_s is not None

    def cost(self) -> float:
        """A verify step's time in one-token steps (measured here once both were seen)."""
        if self.plain_s is not None and self.verify_s is not None:
            return self.verify_s / self.plain_s
        return self.ratio

    def record_plain(self, seconds: float) -> None:
        self.plain_s = self._ema(self.plain_s, seconds)

    def record_verify(self, seconds: float, emitted: int) -> None:
        self.verifies += 1
        self.verify_s = self._ema(self.verify_s, seconds)
        self.tokens = self._ema(self.tokens if self.verifies > 1 else None, float(emitted))
