"""The controller's runtime: everything between kopf's watches and `reconcile.reconcile`.

- `kube`: a plain-JSON client for the API server (every write counted), object paths.
- `cache`: `View`, what the operator knows of its jobs and their children, fed by watches.
- `queue`: `WorkQueue`, client-go's work queue (one worker per job at a time, backoff).
- `stores`: `StoreReader`, final checkpoints and progress read with the operator's own keys.
- `leader`: `LeaderElector`, the coordination.k8s.io Lease only one replica holds.
- `controller`: `Controller`, the workers that read, decide and apply; the resync tick.
- `logs`: one JSON object per log line.

`handlers` wires these to kopf and runs them; `settings` says how.
"""
