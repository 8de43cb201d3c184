"""The pod: one daemon process, or a supervisor of several worker processes (`LSTMD_WORKERS`).

Why processes: the daemon is bound by kafka-python's per-record Python (fetch
parsing, `producer.send`) under one GIL, so a second core is only used by a second
interpreter. Each worker is a whole daemon: `python -m daemon run` started again
with an internal worker index (`_LSTMD_WORKER_INDEX`, not an `LSTMD_` setting),
its own consumer in the group, its own producer, state store, model and engine.
A fresh interpreter rather than `fork`: TensorFlow and kafka-python's threads do
not survive a fork, and the worker runs exactly the code path of a one-process pod.
Subprocess rather than multiprocessing's `spawn`: nothing is pickled, and a worker
is what an operator could start by hand.

The supervisor (the process `lstmd run` started, supervisor.py) loads no model and
holds no Kafka client. It validates the configuration first (a bad one exits 2
before any worker starts), then starts the workers and serves the pod's one HTTP
port: their aggregated metrics and probes (daemon/ops/pod.py). Each worker is
the one-process daemon of serve.py, told its place by roles.py; launch.py decides
which of them `lstmd run` is.

Static membership: with `LSTMD_GROUP_INSTANCE_ID=<id>`, worker i is the group
member `<id>-w<i>` (and so its exactly-once transactional id differs too); a
one-worker pod keeps `<id>` itself.

Failure policy: SIGTERM or SIGINT is forwarded to every worker, which checkpoints
and exits as a one-process daemon does; the supervisor waits up to
LSTMD_SHUTDOWN_TIMEOUT_S plus a margin and exits 0 if every worker exited 0. A
worker that exits on its own (a crash, an unrecoverable Kafka error) stops the
others and the supervisor exits non-zero: Kubernetes restarts the pod. Restarting
the one worker in place would hide a crash loop from the pod's restart count and
its back-off, and the group rebalances either way. A worker's start-up error (an
unservable model, a missing topic) is written to its directory, not printed: the
supervisor prints each distinct message once and exits 2.
"""
