"""`Scaffold`: where TF1 code hands over its saver and summary op."""

_TF1_ONLY = ("init_op", "init_feed_dict", "init_fn", "ready_op",
             "ready_for_local_init_op", "local_init_op", "local_init_feed_dict",
             "copy_from_scaffold")


class Scaffold:
    """Carries `saver` and `summary_op` to the hooks.

    TF1's initialisation arguments (`init_op`, `ready_op`, `local_init_op`, ...)
    have no meaning in TF2, where variables exist as soon as they are created;
    passing one raises a ValueError rather than being ignored silently.
    """

    def __init__(self, init_op=None, init_feed_dict=None, init_fn=None, ready_op=None,
                 ready_for_local_init_op=None, local_init_op=None, summary_op=None,
                 saver=None, copy_from_scaffold=None, local_init_feed_dict=None):
        given = {name: value for name, value in locals().items() if name in _TF1_ONLY}
        bad = sorted(name for name, value in given.items() if value is not None)
        if bad:
            raise ValueError(
                "Scaffold(%s=...) is a TF1 graph-initialisation argument with no TF2 "
                "meaning; create your variables before the session instead, and pass "
                "only saver= and summary_op= to Scaffold." % ", ".join(bad))
        self._summary_op = summary_op
        self._saver = saver

    @property
    def saver(self):
        return self._saver

    @property
    def summary_op(self):
        return self._summary_op

    def finalize(self):
        """No-op, kept for TF1 code that calls it."""
        return self
