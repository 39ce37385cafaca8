"""The one-node test cluster: build scripts, images and the assets the harness starts."""
