#!/usr/bin/env bash
# Installs the Debian packages the one-node test cluster needs: containerd and runc (the container
# runtime), the CNI plugins (bridge, host-local, portmap), iptables and conntrack (kube-proxy),
# gcc and libc6-dev (the static pause binary), debootstrap (the base image) and buildah (builds the
# Dockerfile's operator target). Only what is missing is installed; a no-op when all are there.
set -euo pipefail

packages=(containerd runc containernetworking-plugins iptables conntrack gcc libc6-dev
	debootstrap buildah)
missing=()
for package in "${packages[@]}"; do
	status="$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)"
	[[ $status == "install ok installed" ]] || missing+=("$package")
done
if ((${#missing[@]} == 0)); then
	exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
	echo "install-node-packages: missing ${missing[*]}; rerun as root" >&2
	exit 1
fi
echo "install-node-packages: installing ${missing[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
