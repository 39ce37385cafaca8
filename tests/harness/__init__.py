"""Real parts for the tests: a kube-apiserver + etcd, an S3 server, kubectl and helm."""
