"""A loopback TCP proxy that can hold an upload half-way, so a test can stop the server behind it then.

It forwards bytes unchanged between a client (gcsfs) and a real server (the
GCS emulator). Armed with `hold_after(n)`, it stops forwarding the client's
bytes once `n` of them have gone up and sets `held`: the upload is provably
in progress, and the test can stop the server at that moment rather than
hope a sleep lands there. `release()` lets the held bytes go on (to a server
that may no longer be there). No bytes are changed or invented: the faults the
client sees come from the real server going away.
"""

import contextlib
import socket
import threading

from gcs_emulator import free_port


class HoldingProxy:
    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = free_port()
        self.endpoint = "http://127.0.0.1:%d" % self.port
        self.held = threading.Event()
        self._release = threading.Event()
        self._release.set()
        self._lock = threading.Lock()
        self._threshold = None
        self._sent_up = 0
        self._sockets = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        self.refusing = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def hold_after(self, nbytes: int) -> None:
        """Holds the client's bytes once `nbytes` more of them have been forwarded."""
        with self._lock:
            self._threshold = self._sent_up + nbytes
            self.held.clear()
            self._release.clear()

    def release(self) -> None:
        with self._lock:
            self._threshold = None
        self._release.set()

    def cut(self, refuse: bool = True) -> None:
        """Drops every open connection; with `refuse`, closes new ones at once until `accept_again()`.

        The client sees what a dead network path gives it: connections reset and
        closed before any response. The server behind keeps running, with its data.
        """
        self.refusing = refuse
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        self.release()

    def accept_again(self) -> None:
        self.refusing = False

    def close(self) -> None:
        self._closed = True
        self.release()
        with contextlib.suppress(OSError):
            self._listener.close()
        for s in list(self._sockets):
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self):
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:  # the server is down: the client sees its connection closed, as it would
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src, dst, upward):
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if upward:
                    with self._lock:
                        self._sent_up += len(data)
                        hold = self._threshold is not None and self._sent_up >= self._threshold
                    if hold:
                        self.held.set()
                        self._release.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
