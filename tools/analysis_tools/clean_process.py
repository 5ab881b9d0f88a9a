"""Functions run in processes as clean as fresh ones, without paying for the imports again.

The CPU peak-memory measurements of ``tools/benchmark.py`` and ``tools/benchmark_op.py``
need a process whose heap holds no freed memory from earlier work, which would hide a
peak. A fresh interpreter has such a heap but imports torch, mmengine, mmpretrain and
mmdwnet first: about 8 s on 2 cores, for a measurement that takes 1 to 3 s at small sizes.
:class:`CleanProcess` forks a copy of the tool once, right after its imports and before
any model or torch operation ran, and every measurement runs in a child forked from that
copy. No OpenMP thread exists at that point, so the children run torch's threads as a
fresh process does. (The measurements read Linux's ``/proc``, where ``os.fork`` exists.)
"""
import os
import pickle
import traceback
from typing import Callable

from analysis_tools.malloc import return_freed_memory


class CleanProcess:
    """A copy of this process as it is when created, from which :meth:`call` forks a child
    per call.

    Create it before anything that should not be in the children ran: in the tools, right
    after parsing the arguments. The copy waits on a pipe and does nothing else; it ends
    when :meth:`close` is called or this process ends. Each child makes glibc's malloc give
    freed memory back at once (:func:`analysis_tools.malloc.return_freed_memory`), runs the
    function and sends back its result (which must pickle); an exception in it, or its
    death, raises :class:`RuntimeError` here with its traceback or exit status.

    The function and its arguments are pickled: a function of a tool run as a script is
    found in the copy's ``__main__``, which is the same script.
    """

    def __init__(self):
        if not hasattr(os, 'fork'):
            raise RuntimeError('CleanProcess: os.fork is not available on this platform')
        request_r, self._request_w = os.pipe()
        self._reply_r, reply_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the copy: never returns
            os.close(self._request_w)
            os.close(self._reply_r)
            self._serve(request_r, reply_w)
        os.close(request_r)
        os.close(reply_w)
        self._requests = os.fdopen(self._request_w, 'wb')
        self._replies = os.fdopen(self._reply_r, 'rb')

    @staticmethod
    def _serve(request_r: int, reply_w: int) -> None:
        status = 0
        try:
            requests, replies = os.fdopen(request_r, 'rb'), os.fdopen(reply_w, 'wb')
            while True:
                try:
                    request = pickle.load(requests)  # the pickled call, unpickled by the child
                except EOFError:  # closed, or the parent ended
                    break
                pickle.dump(CleanProcess._run_forked(request), replies)
                replies.flush()
        except BaseException:  # noqa: B036  (the copy must never return into the caller)
            traceback.print_exc()
            status = 1
        os._exit(status)

    @staticmethod
    def _run_forked(request: bytes):
        """Fork a child that runs the pickled ``(fn, args, kwargs)`` of ``request``; its
        ``('ok', result)`` or ``('error', message)``."""
        result_r, result_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(result_r)
            status = 0
            try:
                return_freed_memory()
                fn, args, kwargs = pickle.loads(request)
                reply = ('ok', fn(*args, **kwargs))
            except BaseException:  # noqa: B036
                reply, status = ('error', traceback.format_exc()), 1
            with os.fdopen(result_w, 'wb') as f:
                pickle.dump(reply, f)
            os._exit(status)
        os.close(result_w)
        with os.fdopen(result_r, 'rb') as f:
            data = f.read()
        status = os.waitpid(pid, 0)[1]
        if not data:
            return ('error', f'the child process ended with exit status '
                             f'{os.waitstatus_to_exitcode(status)} and no result')
        return pickle.loads(data)

    def call(self, fn: Callable, *args, what: str = 'the call', **kwargs):
        """``fn(*args, **kwargs)`` in a child forked from the copy; its result. ``what``
        names the work in the error raised when the child fails."""
        if self._requests is None:
            raise RuntimeError('CleanProcess.call: the process was closed')
        try:
            pickle.dump(pickle.dumps((fn, args, kwargs)), self._requests)
            self._requests.flush()
            status, value = pickle.load(self._replies)
        except (BrokenPipeError, EOFError):
            raise RuntimeError(f'{what} failed: the clean process (pid {self.pid}) ended')
        if status != 'ok':
            raise RuntimeError(f'{what} failed:\n{value}')
        return value

    def close(self) -> None:
        """End the copy (idempotent)."""
        if self._requests is None:
            return
        self._requests.close()
        self._replies.close()
        self._requests = self._replies = None
        os.waitpid(self.pid, 0)

    def __enter__(self) -> 'CleanProcess':
        return self

    def __exit__(self, *exc) -> None:
        self.close()
