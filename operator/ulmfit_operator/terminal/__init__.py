"""ULMFiTJobs from the terminal: `ulmfit get|describe|logs|dashboard|suspend|resume` and the
kubectl plugin `kubectl-ulmfit`.

`render` turns the job's JSON into text (pure), `kube` talks to the API server with the user's
kubeconfig, `commands` wires the two into typer commands.
"""
