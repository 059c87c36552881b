"""Agreement between the processes of a `jax.distributed` job, for one collective call.

A collective write (`save_sharded`) runs in phases, and each phase ends with every
process knowing how every other one fared: each publishes its outcome (a value, or
the error it met) in the distributed client's key-value store, and reads the others'.
An error anywhere is raised everywhere, naming the process that met it; a process that
never publishes (killed, hung) is reported after `timeout` seconds instead of blocking
forever. With one process nothing is exchanged and the phases cost nothing.

Every call takes fresh keys from a counter that advances alike in every process, since
every process makes the same calls in the same order.
"""

from __future__ import annotations

import builtins
import contextlib
import itertools
import json
from collections.abc import Callable
from typing import Any, TypeVar

import jax

T = TypeVar("T")

_CALLS = itertools.count()

# Errors that cross processes keep their type; any other arrives as a RuntimeError.
_KEPT = (
    ValueError,
    TypeError,
    FileExistsError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    TimeoutError,
    OSError,
)


def _client() -> Any:
    from jax._src import distributed

    return distributed.global_state.client


class Processes:
    """This process's place among the processes of one collective call.

    Attributes:
        rank: this process's index.
        count: how many processes take part.
        timeout: seconds to wait for another process at any one phase.
    """

    def __init__(self, name: str, timeout: float) -> None:
        self.rank = jax.process_index()
        self.count = jax.process_count()
        self.timeout = timeout
        self._client = _client() if self.count > 1 else None
        self._prefix = f"stackedtree/{name}/{next(_CALLS)}/"

    def _set(self, key: str, value: Any) -> None:
        if self._client is None:
            return
        try:
            self._client.key_value_set(self._prefix + key, json.dumps(value))
        except Exception as e:  # the client's own error types are not public
            raise ConnectionError(
                f"process {self.rank} could not reach the jax.distributed "
                f"coordination service (process 0 may have stopped): {_first(e)}"
            ) from None

    def _fail(self, key: str, e: BaseException) -> None:
        """Publishes error `e`, if the other processes can still be reached."""
        with contextlib.suppress(ConnectionError):
            self._set(key, {"error": _encode(e)})

    def _get(self, key: str, process: int, what: str) -> Any:
        assert self._client is not None
        try:
            raw = self._client.blocking_key_value_get(
                self._prefix + key, int(self.timeout * 1000)
            )
        except Exception as e:  # the client's own error types are not public
            if "DEADLINE_EXCEEDED" not in str(e):
                raise ConnectionError(
                    f"process {self.rank} could not learn whether process {process} "
                    f"did {what}: the jax.distributed coordination service (in "
                    f"process 0) cannot be reached: {_first(e)}"
                ) from None
            raise TimeoutError(
                f"process {process} did not {what} within {self.timeout:g} s "
                f"({_first(e)})"
            ) from None
        return json.loads(raw)

    def all_run(self, key: str, what: str, fn: Callable[[], T]) -> list[Any]:
        """Runs `fn` here, and returns every process's result, in process order.

        Raises:
            The error `fn` raised here; else the first error another process's
            `fn` raised, as the same type (or `RuntimeError`) naming that process;
            TimeoutError: a process did not report within `timeout`.
        """
        try:
            mine = fn()
        except BaseException as e:
            self._fail(f"{key}/{self.rank}", e)
            raise
        self._set(f"{key}/{self.rank}", {"value": mine})
        results: list[Any] = []
        for q in range(self.count):
            if q == self.rank:
                results.append(mine)
                continue
            got = self._get(f"{key}/{q}", q, what)
            if "error" in got:
                raise _decode(q, got["error"])
            results.append(got["value"])
        return results

    def lead_run(self, key: str, what: str, fn: Callable[[], T]) -> T:
        """Runs `fn` in process 0 and returns its result in every process.

        Raises:
            As `all_run`, for process 0's `fn`.
        """
        if self.rank == 0:
            try:
                value = fn()
            except BaseException as e:
                self._fail(key, e)
                raise
            self._set(key, {"value": value})
            return value
        got = self._get(key, 0, what)
        if "error" in got:
            raise _decode(0, got["error"])
        result: T = got["value"]
        return result

    def report(self, key: str, error: BaseException | None) -> None:
        """Publishes this process's outcome of a phase that only process 0 collects."""
        if error is not None:
            self._fail(f"{key}/{self.rank}", error)
        else:
            self._set(f"{key}/{self.rank}", {"value": 0})

    def collect(self, key: str, what: str) -> None:
        """In process 0: waits for every other process's `report`.

        Raises:
            The first reported error, naming its process; TimeoutError: a process
            did not report within `timeout`.
        """
        for q in range(1, self.count):
            got = self._get(f"{key}/{q}", q, what)
            if "error" in got:
                raise _decode(q, got["error"])


def _first(e: BaseException) -> str:
    """The client error's type and first line."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _encode(e: BaseException) -> list[str]:
    return [type(e).__name__, str(e)]


def _decode(process: int, error: list[str]) -> Exception:
    name, text = error
    kind = getattr(builtins, name, None)
    if not (isinstance(kind, type) and issubclass(kind, _KEPT)):
        kind = RuntimeError
        text = f"{name}: {text}"
    return kind(f"process {process}: {text}")
