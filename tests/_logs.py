"""Collect loguru messages in tests (what a run tells its user)."""

from __future__ import annotations


class collect_logs:
    """Collect the loguru messages logged inside the block."""

    def __enter__(self) -> list[str]:
        from loguru import logger

        self.msgs: list[str] = []
        self.sink = logger.add(lambda m: self.msgs.append(m.record["message"]), level="INFO")
        return self.msgs

    def __exit__(self, *exc) -> None:
        from loguru import logger

        logger.remove(self.sink)
