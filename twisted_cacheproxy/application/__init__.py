"""The application: the twistd plugins' options (`options`), start-up checks
and the start-up line (`startup`, `settings`), the one place that builds
every part (`compose`), the plugins' entry points (`tap`), and ``--workers``
(`parent`, and `worker`, the process each worker runs)."""
